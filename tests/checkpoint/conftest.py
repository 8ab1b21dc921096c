"""Helpers for the checkpoint-directory tests: build checkpoints by hand, without ckptio's weight writer."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ckptio.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointManifest,
    begin_checkpoint,
    commit_checkpoint,
    parse_checkpoint_id,
    utc_timestamp,
)
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord, checksum_bytes

#: A tiny checkpoint: bytes standing in for weights and one component.
DEFAULT_FILES = {"model.safetensors": b"w" * 64, "optimizer_state.pt": b"o" * 32}

MakeCheckpoint = Callable[..., Storage]


def timestamp(second: int) -> str:
    """A fixed ISO-8601 UTC timestamp ``second`` seconds after 2024-01-01T00:00:00."""
    minutes, seconds = divmod(second, 60)
    return f"2024-01-01T00:{minutes:02d}:{seconds:02d}.000000+00:00"


def build_checkpoint(
    root: Storage,
    name: str,
    files: dict[str, bytes] | None = None,
    *,
    at: str | None = None,
    commit: bool = True,
    marker: bool = False,
) -> Storage:
    """Write ``files`` into an emptied ``checkpoints/<name>`` of ``root`` and return that directory.

    With ``commit`` a manifest listing every file (timestamp ``at``, default
    now) is written last; with ``marker`` the in-progress marker is written first.
    """
    checkpoint = root.child(f"{CHECKPOINTS_DIR}/{name}")
    checkpoint.delete_prefix("")  # built afresh: a commit never overwrites an existing manifest
    if marker:
        begin_checkpoint(checkpoint, checkpoint_id=parse_checkpoint_id(name), world_size=1)
    contents = DEFAULT_FILES if files is None else files
    for key, data in contents.items():
        checkpoint.write_bytes(key, data)
    if commit:
        manifest = CheckpointManifest(
            checkpoint_path=f"{CHECKPOINTS_DIR}/{name}",
            world_size=1,
            timestamp=at or utc_timestamp(),
            checkpoint_id=parse_checkpoint_id(name),
            files=[FileRecord(k, len(v), checksum_bytes(v)) for k, v in sorted(contents.items())],
        )
        commit_checkpoint(checkpoint, manifest)
    return checkpoint


@pytest.fixture
def make_checkpoint(storage: Storage) -> MakeCheckpoint:
    """``make_checkpoint(name, files=None, at=None, commit=True, marker=False)`` on the test's storage."""

    def make(name: str, files: dict[str, bytes] | None = None, **kwargs: object) -> Storage:
        return build_checkpoint(storage, name, files, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def at() -> Callable[[int], str]:
    """``at(n)``: a fixed ISO-8601 UTC timestamp ``n`` seconds after 2024-01-01T00:00:00."""
    return timestamp

