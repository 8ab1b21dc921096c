"""Find the checkpoints of a run and pick the newest complete one.

Checkpoints live in ``<model_dir>/checkpoints/checkpoint-*``. They are ordered
oldest to newest by their manifest timestamp (UTC, written by the saving
process), ties broken by checkpoint number. Only a directory without a
manifest falls back to the newest modification time of the objects inside it:
directory modification times do not exist on object stores and change on
local disk whenever a file is added, so they are never used.

Discovery reads the storage afresh on every call (one listing of
``checkpoints/``, one manifest read per checkpoint, size lookups), renames
nothing and caches nothing, so it answers the same on local disk, S3 and GCS,
and sees checkpoints written by other processes at once. A checkpoint whose
manifest or index is malformed is reported as incomplete with a warning;
discovery itself never raises for one.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass
from typing import Any

from ckptio.checkpoint.layout import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    join_location,
    parse_checkpoint_id,
)
from ckptio.checkpoint.manifest import parse_timestamp
from ckptio.checkpoint.validate import (
    CheckpointStatus,
    inspect_checkpoint,
    object_infos,
)
from ckptio.errors import CorruptCheckpointError, InvalidArgumentError
from ckptio.storage import Storage, resolve_storage

__all__ = ["CheckpointEntry", "entry_sort_key", "find_latest_checkpoint", "list_checkpoints"]

logger = logging.getLogger(__name__)

_UNKNOWN_TIME = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class CheckpointEntry:
    """One ``checkpoints/checkpoint-*`` directory as discovery sees it.

    Attributes:
        name: directory name (``"checkpoint-7"``).
        checkpoint_id: its number, or None for a non-numeric name (``"checkpoint-final"``).
        status: complete, incomplete or not a checkpoint.
        timestamp: the manifest timestamp (ISO-8601 UTC), None without a readable manifest.
        mtime: newest modification time of its objects (seconds since the epoch);
            only looked up for directories without a readable manifest.
        url: full URL (or local path) of the directory.
        size_bytes: total size of the files its manifest lists, None without one.
        error: why it could not be inspected (malformed manifest or index);
            rotation never deletes such a checkpoint.
    """

    name: str
    checkpoint_id: int | None
    status: CheckpointStatus
    timestamp: str | None
    mtime: float | None
    url: str = ""
    size_bytes: int | None = None
    error: str | None = None

    @property
    def is_complete(self) -> bool:
        """Whether the checkpoint is complete."""
        return self.status is CheckpointStatus.COMPLETE

    @property
    def time(self) -> _dt.datetime | None:
        """The time the entry is ordered by: manifest timestamp, else newest object mtime."""
        if self.timestamp is not None:
            try:
                return parse_timestamp(self.timestamp)
            except InvalidArgumentError:
                return None
        if self.mtime is not None:
            return _dt.datetime.fromtimestamp(self.mtime, _dt.timezone.utc)
        return None


def entry_sort_key(entry: CheckpointEntry) -> tuple[_dt.datetime, int, str]:
    """Sort key, oldest first: (time, checkpoint number, name); unknown times sort oldest."""
    time = entry.time
    number = entry.checkpoint_id if entry.checkpoint_id is not None else -1
    return (time if time is not None else _UNKNOWN_TIME, number, entry.name)


def _entry(storage: Storage, name: str, keys: list[str]) -> CheckpointEntry:
    """Inspect one checkpoint directory whose object keys are already listed."""
    checkpoint = storage.child(f"{CHECKPOINTS_DIR}/{name}")
    error: str | None = None
    try:
        inspection = inspect_checkpoint(checkpoint, keys=keys)
        status, manifest = inspection.status, inspection.manifest
    except CorruptCheckpointError as exc:
        logger.warning("treating %s as incomplete: %s", checkpoint.url, exc)
        status, manifest, error = CheckpointStatus.INCOMPLETE, None, str(exc)
    mtime: float | None = None
    if manifest is None:
        times = [i.mtime for i in object_infos(checkpoint, keys).values() if i.mtime is not None]
        mtime = max(times, default=None)
    return CheckpointEntry(
        name=name,
        checkpoint_id=parse_checkpoint_id(name),
        status=status,
        timestamp=manifest.timestamp if manifest is not None else None,
        mtime=mtime,
        url=checkpoint.url,
        size_bytes=manifest.total_size if manifest is not None else None,
        error=error,
    )


def list_checkpoints(
    model_dir_or_storage: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
) -> list[CheckpointEntry]:
    """List ``<model_dir>/checkpoints/checkpoint-*``, oldest first.

    Every directory named ``checkpoint-<something>`` that holds at least one
    object is listed, complete or not. Ordered by manifest timestamp, then
    checkpoint number; directories without a manifest are placed by the newest
    modification time of their objects.

    Raises:
        StorageError: the listing itself failed. A malformed checkpoint never raises.
    """
    return _scan(resolve_storage(model_dir_or_storage, storage_options))[0]


def _scan(storage: Storage) -> tuple[list[CheckpointEntry], bool]:
    """The sorted entries under ``checkpoints/``, and whether it holds any object at all."""
    groups: dict[str, list[str]] = {}
    keys = storage.walk(CHECKPOINTS_DIR)
    for key in keys:
        name, sep, rest = key.partition("/")
        if sep and rest and name.startswith(CHECKPOINT_PREFIX):
            groups.setdefault(name, []).append(rest)
    entries = [_entry(storage, name, group) for name, group in groups.items()]
    return sorted(entries, key=entry_sort_key), bool(keys)


def find_latest_checkpoint(
    model_dir: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """Return the newest complete checkpoint under ``model_dir``, or None.

    Among ``<model_dir>/checkpoints/checkpoint-*``, the newest complete one
    (manifest timestamp, then checkpoint number; modification time only for
    directories without a manifest). When ``checkpoints/`` holds no objects at
    all, ``model_dir`` itself is returned if it is a valid checkpoint (a plain
    model directory). Incomplete checkpoints, including a save in progress or
    one that crashed after its weights were written, are never returned.

    Returns:
        The checkpoint's path in the caller's form (a local path stays a local
        path, a URL stays a URL; a Storage gives its URL), or None.
    """
    storage = resolve_storage(model_dir, storage_options)
    entries, has_checkpoints_dir = _scan(storage)
    complete = [e for e in entries if e.is_complete]
    if complete:
        return join_location(model_dir, f"{CHECKPOINTS_DIR}/{complete[-1].name}")
    if has_checkpoints_dir:
        return None
    try:
        status = inspect_checkpoint(storage).status
    except CorruptCheckpointError as exc:
        logger.warning("%s is not a usable checkpoint: %s", storage.url, exc)
        return None
    return join_location(model_dir, "") if status is CheckpointStatus.COMPLETE else None
