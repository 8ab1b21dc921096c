"""Whether a checkpoint directory is complete, and whether its bytes are intact.

The rules (SPEC section 3, "Validity"), in order:

1. **Manifest present**: complete iff every file the manifest lists exists with
   exactly the listed size. A leftover in-progress marker does not matter.
2. **In-progress marker, no manifest**: incomplete, whatever else is there (a
   save crashed after writing the weights must never pass for a checkpoint).
3. **Neither** (a plain model directory, or a checkpoint written by an older
   tool): complete when a weights or index file exists (the four Hugging Face
   names) and every shard each index names exists; *incomplete* when a
   weights or index file exists but an index names a missing shard;
   *not a checkpoint* when there is no weights or index file at all
   (unrecognised content is never called incomplete, so rotation never
   deletes it).

The check costs one listing (:meth:`~ckptio.storage.Storage.list_objects`,
which carries every object's size) and the manifest read; never a request per
file. Checksums are only recomputed on demand (:func:`verify_checkpoint`),
because that reads every byte.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ckptio.checkpoint.layout import IN_PROGRESS_NAME, MANIFEST_NAME
from ckptio.checkpoint.manifest import CheckpointManifest, read_manifest
from ckptio.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ObjectNotFoundError,
)
from ckptio.format.constants import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from ckptio.format.index import index_shard_files, read_index
from ckptio.storage import ObjectInfo, Storage, resolve_storage
from ckptio.storage.integrity import checksum_object
from ckptio.storage.transfer import map_concurrently

__all__ = [
    "CheckpointInspection",
    "CheckpointStatus",
    "checkpoint_status",
    "inspect_checkpoint",
    "validate_checkpoint",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)


_INDEX_NAMES = (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME)
WEIGHTS_NAMES = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, *_INDEX_NAMES)
_MAX_WORKERS = 16


class CheckpointStatus(Enum):
    """What a directory is, by the validity rules of this module."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    NOT_A_CHECKPOINT = "not_a_checkpoint"


@dataclass(frozen=True)
class CheckpointInspection:
    """The status of a checkpoint directory and why.

    Attributes:
        status: complete, incomplete, or not a checkpoint.
        manifest: the parsed manifest, when the directory has one.
        problems: why it is not complete (missing files, size mismatches), empty when complete.
        keys: every object key found in the directory (one listing).
        objects: what that listing said of each object (size, mtime, version), by key.
    """

    status: CheckpointStatus
    manifest: CheckpointManifest | None
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    objects: dict[str, ObjectInfo] = field(default_factory=dict, compare=False, repr=False)


def _manifest_problems(storage: Storage, manifest: CheckpointManifest, infos: dict[str, ObjectInfo]) -> list[str]:
    """Missing files and size mismatches of the files a manifest lists, judged from a listing."""
    problems: list[str] = []
    for record in manifest.files:
        info = infos.get(record.path)
        if info is None:
            problems.append(f"{storage.url_of(record.path)} is missing (manifest lists {record.size} bytes)")
        elif info.size != record.size:
            problems.append(
                f"{storage.url_of(record.path)} has the wrong size: manifest lists {record.size} bytes, "
                f"object has {info.size}"
            )
    return problems


def _weights_status(storage: Storage, keys: set[str]) -> tuple[CheckpointStatus, list[str]]:
    """Status of a directory with neither manifest nor marker, by its weights files."""
    if not any(name in keys for name in WEIGHTS_NAMES):
        return CheckpointStatus.NOT_A_CHECKPOINT, [f"{storage.url} has no manifest and no weights or index file"]
    problems: list[str] = []
    for index_name in _INDEX_NAMES:
        if index_name in keys:
            index = read_index(storage, index_name)
            problems += [
                f"{storage.url_of(shard)} is missing (named by {index_name})"
                for shard in index_shard_files(index)
                if shard not in keys
            ]
    return (CheckpointStatus.INCOMPLETE if problems else CheckpointStatus.COMPLETE), problems


def inspect_checkpoint(storage: Storage, *, objects: Iterable[ObjectInfo] | None = None) -> CheckpointInspection:
    """Classify a checkpoint directory by the validity rules and say why.

    Costs one listing (none when ``objects`` is given) and one manifest read
    (none when this process already read that very manifest object).

    Args:
        storage: the checkpoint directory.
        objects: the directory's objects (keys relative to it) when the caller
            already listed them; listed here otherwise.

    Raises:
        CorruptCheckpointError: the manifest, or (without a manifest) a shard
            index, is malformed; the message names its URL. Nothing is changed.
    """
    infos = {o.key: o for o in (objects if objects is not None else storage.list_objects(""))}
    listed = sorted(infos)
    present = set(listed)
    manifest: CheckpointManifest | None = None
    if MANIFEST_NAME in present:
        manifest = read_manifest(storage, listed=infos[MANIFEST_NAME])
    if manifest is not None:
        problems = _manifest_problems(storage, manifest, infos)
        status = CheckpointStatus.INCOMPLETE if problems else CheckpointStatus.COMPLETE
    elif IN_PROGRESS_NAME in present:
        status = CheckpointStatus.INCOMPLETE
        problems = [f"{storage.url_of(IN_PROGRESS_NAME)} marks a save that never committed (no manifest)"]
    else:
        status, problems = _weights_status(storage, present)
    if problems:
        logger.debug("%s is %s: %s", storage.url, status.value, "; ".join(problems))
    return CheckpointInspection(status=status, manifest=manifest, problems=problems, keys=listed, objects=infos)


def checkpoint_status(storage: Storage) -> CheckpointStatus:
    """Return whether ``storage`` holds a complete checkpoint (see the module docstring).

    Raises:
        CorruptCheckpointError: the manifest or an index is malformed (naming its URL).
    """
    return inspect_checkpoint(storage).status


def _checksum_problem(storage: Storage, path: str, expected: str) -> str | None:
    try:
        got = checksum_object(storage, path).crc32c
    except ObjectNotFoundError:
        return f"{storage.url_of(path)} is missing"
    if got != expected:
        return f"{storage.url_of(path)} is corrupt: CRC32C expected {expected}, got {got}"
    return None


def verify_checkpoint(
    checkpoint_path_or_storage: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Check every file of a checkpoint: presence, size, and CRC32C (reads every byte).

    A directory without a manifest has no checksums: it is checked by the
    weights rule only (presence of every shard).

    Returns:
        One message per problem (missing file, size or checksum mismatch,
        malformed manifest or index, not a checkpoint), each naming the URL;
        an empty list when everything matches.
    """
    storage = resolve_storage(checkpoint_path_or_storage, storage_options)
    try:
        inspection = inspect_checkpoint(storage)
    except CorruptCheckpointError as exc:
        return [str(exc)]
    if inspection.problems or inspection.manifest is None:
        return list(inspection.problems)
    records = inspection.manifest.files
    found = map_concurrently(
        lambda r: _checksum_problem(storage, r.path, r.crc32c), records, workers=storage.concurrency(_MAX_WORKERS)
    )
    problems = [p for p in found if p is not None]
    logger.info("verified %s: %d files, %d problems", storage.url, len(records), len(problems))
    return problems


def validate_checkpoint(
    checkpoint_path: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
    verify_checksums: bool = False,
) -> bool:
    """Return whether ``checkpoint_path`` is a complete checkpoint.

    Never raises for a missing, incomplete or corrupt checkpoint: it returns
    False and logs why (INFO). Storage failures other than "not found"
    (permissions, an unreachable endpoint) still raise, because they say
    nothing about the checkpoint.

    Args:
        checkpoint_path: local path, URL, or Storage of the checkpoint directory.
        storage_options: fsspec options for the backend.
        verify_checksums: also recompute every file's CRC32C (reads every byte).
    """
    storage = resolve_storage(checkpoint_path, storage_options)
    try:
        if verify_checksums:
            problems = verify_checkpoint(storage)
        else:
            problems = inspect_checkpoint(storage).problems
    except (CorruptCheckpointError, IncompleteCheckpointError, ObjectNotFoundError) as exc:
        problems = [str(exc)]
    if problems:
        logger.info("%s is not a valid checkpoint: %s", storage.url, "; ".join(problems))
    return not problems
