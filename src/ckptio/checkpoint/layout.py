"""Names and paths of the checkpoint directory layout (pure: no I/O).

A training run writes into an output directory (local path or URL)::

    <output_dir>/
        checkpoints/
            checkpoint-100/
                checkpoint_in_progress.json   written first, removed after the commit
                model-00001-of-00002.safetensors, ..., model.safetensors.index.json
                optimizer_state.pt, rng_state_rank_0.pt, ...
                eval_metrics.json             when metrics were given
                checkpoint_manifest.json      written last: the commit record
            checkpoint-200/

Everything here is string manipulation on POSIX keys and URLs; ``os.path`` is
never used on a URL.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ckptio.errors import InvalidArgumentError
from ckptio.format.layout import is_weight_file_name
from ckptio.storage import Storage

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_PREFIX",
    "DCP_METADATA_NAME",
    "IN_PROGRESS_NAME",
    "MANIFEST_NAME",
    "METRICS_NAME",
    "checkpoint_dir_name",
    "checkpoint_key",
    "is_checkpoint_file",
    "join_location",
    "location_name",
    "next_checkpoint_path",
    "parse_checkpoint_id",
]

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST_NAME = "checkpoint_manifest.json"
IN_PROGRESS_NAME = "checkpoint_in_progress.json"
METRICS_NAME = "eval_metrics.json"
#: DCP's metadata in a checkpoint written through :mod:`ckptio.dcp` (sharded state).
DCP_METADATA_NAME = "dcp_metadata.pkl"

_CHECKPOINT_NAME = re.compile(r"^checkpoint-([0-9]+)$")
#: Component state files: ``{key}_state.pt``, ``..._rank_{r}.pt``, ``..._node_{n}.pt``, ``..._group_{g}_grank_{r}.pt``.
_COMPONENT_FILE = re.compile(r"^[^/]+_state(_rank_[0-9]+|_node_[0-9]+|_group_[^/]+_grank_[0-9]+)?\.pt$")
_COMMIT_FILES = frozenset({MANIFEST_NAME, IN_PROGRESS_NAME, METRICS_NAME, DCP_METADATA_NAME})
#: Data files of sharded state written through :mod:`ckptio.dcp`: ``rank00001-part002.distcp``.
_DCP_DATA_FILE = re.compile(r"^rank[0-9]{5}-part[0-9]{3}\.distcp$")


def is_checkpoint_file(key: str) -> bool:
    """Whether ``key`` (relative to a checkpoint directory) is a file a checkpoint save writes.

    The commit objects, metrics, Hugging Face weights, index and shard files,
    component state files, and DCP's data files and metadata. Used to tell a crashed save's leftovers (safe
    to delete) from a folder that also holds someone else's files (never deleted).
    """
    return (
        key in _COMMIT_FILES
        or is_weight_file_name(key)
        or _COMPONENT_FILE.match(key) is not None
        or _DCP_DATA_FILE.match(key) is not None
    )


def parse_checkpoint_id(name: str) -> int | None:
    """Return the number of a ``checkpoint-<digits>`` directory name, else None.

    Only the bare name is parsed (``"checkpoint-7"`` gives 7); paths, other
    prefixes and non-ASCII digits give None.
    """
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def checkpoint_dir_name(checkpoint_id: int | str) -> str:
    """Return the directory name of a checkpoint: ``checkpoint-<id>``.

    Args:
        checkpoint_id: a non-negative step number, or a string that is a single
            safe path component (``"7"``, ``"final"``). A string that already is
            a checkpoint name (``"checkpoint-7"``) is returned unchanged.

    Raises:
        InvalidArgumentError: a negative number, a bool, or a string that is
            empty or would leave the checkpoints directory.
    """
    if isinstance(checkpoint_id, bool) or not isinstance(checkpoint_id, int | str):
        raise InvalidArgumentError(f"checkpoint id must be an int or a str, got {checkpoint_id!r}")
    if isinstance(checkpoint_id, int):
        if checkpoint_id < 0:
            raise InvalidArgumentError(f"checkpoint id must be >= 0, got {checkpoint_id}")
        return f"{CHECKPOINT_PREFIX}{checkpoint_id}"
    if parse_checkpoint_id(checkpoint_id) is not None:
        return checkpoint_id
    if not checkpoint_id or checkpoint_id in (".", "..") or any(c in checkpoint_id for c in "/\\:"):
        raise InvalidArgumentError(
            f"checkpoint id {checkpoint_id!r} must be a single path component (no '/', '\\', ':' or '..')"
        )
    return f"{CHECKPOINT_PREFIX}{checkpoint_id}"


def checkpoint_key(checkpoint_id: int | str) -> str:
    """Return the key of a checkpoint relative to the output directory: ``checkpoints/checkpoint-<id>``."""
    return f"{CHECKPOINTS_DIR}/{checkpoint_dir_name(checkpoint_id)}"


def location_name(location: str | os.PathLike[str]) -> str:
    """The last component of a path or URL (``"checkpoint-7"`` for ``"s3://b/run/checkpoints/checkpoint-7/"``)."""
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def join_location(base: str | os.PathLike[str] | Storage, key: str) -> str:
    """Return ``key`` below ``base`` in the form ``base`` was given.

    A local path stays a local path (relative stays relative), a URL stays a
    URL, joined with ``/``; a :class:`~ckptio.storage.Storage` gives
    ``storage.url_of(key)``. An empty ``key`` returns ``base`` itself.
    """
    if isinstance(base, Storage):
        return base.url_of(key)
    text = os.fspath(base)
    if not key:
        return text
    stripped = text.rstrip("/")
    if not stripped:
        return f"/{key}" if text else key
    if stripped.endswith(":"):  # "s3://" with no bucket: keep the separator
        return f"{text}{key}"
    return f"{stripped}/{key}"


def next_checkpoint_path(
    model_dir: str | os.PathLike[str] | Storage,
    checkpoint_id: int | str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Return ``"<model_dir>/checkpoints/checkpoint-<id>"`` in the caller's form.

    A local path stays a local path and a URL stays a URL (joined with ``/``);
    a :class:`~ckptio.storage.Storage` gives the URL of that key. Nothing is
    created and nothing is contacted, so ``storage_options`` (accepted like in
    every function that takes a directory) are not needed to compute it.

    Raises:
        InvalidArgumentError: the checkpoint id is unusable (see :func:`checkpoint_dir_name`).
    """
    return join_location(model_dir, checkpoint_key(checkpoint_id))
