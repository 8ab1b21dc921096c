"""Find the checkpoints of a run and pick the newest complete one.

Checkpoints live in ``<model_dir>/checkpoints/checkpoint-*``. They are ordered
oldest to newest by their manifest timestamp (UTC, written by the saving
process), ties broken by checkpoint number. Only a directory without a
manifest falls back to the newest modification time of the objects inside it:
directory modification times do not exist on object stores and change on
local disk whenever a file is added, so they are never used.

Discovery costs one paginated listing of everything under ``checkpoints/``,
whatever the number of checkpoints: the listing carries every object's size
and modification time, so no file is ever stat'ed, and a manifest is read only
the first time this process sees it (a committed manifest never changes; see
:func:`~ckptio.checkpoint.manifest.read_manifest`). The listing itself is
never cached, so discovery sees checkpoints written or deleted by other
processes at once, and renames nothing, so it answers the same on local disk,
S3 and GCS. A checkpoint whose manifest or index is malformed is reported as
incomplete with a warning; discovery itself never raises for one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ckptio.checkpoint.layout import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    join_location,
    parse_checkpoint_id,
)
from ckptio.checkpoint.manifest import CheckpointManifest, parse_timestamp
from ckptio.checkpoint.validate import (
    WEIGHTS_NAMES,
    CheckpointStatus,
    inspect_checkpoint,
)
from ckptio.errors import CorruptCheckpointError, InvalidArgumentError
from ckptio.storage import ObjectInfo, Storage, resolve_storage

__all__ = [
    "CheckpointEntry",
    "CheckpointScan",
    "entry_sort_key",
    "find_latest_checkpoint",
    "list_checkpoints",
    "scan_checkpoints",
    "scan_latest_complete",
]

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
        manifest: its parsed manifest, when it has a readable one.
        objects: the objects the listing found in it (keys relative to it).
    """

    name: str
    checkpoint_id: int | None
    status: CheckpointStatus
    timestamp: str | None
    mtime: float | None
    url: str = ""
    size_bytes: int | None = None
    error: str | None = None
    manifest: CheckpointManifest | None = field(default=None, compare=False, repr=False)
    objects: tuple[ObjectInfo, ...] = field(default=(), compare=False, repr=False)

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


def _entry(storage: Storage, name: str, objects: list[ObjectInfo]) -> CheckpointEntry:
    """Inspect one checkpoint directory whose objects are already listed."""
    checkpoint = storage.child(f"{CHECKPOINTS_DIR}/{name}")
    error: str | None = None
    try:
        inspection = inspect_checkpoint(checkpoint, objects=objects)
        status, manifest = inspection.status, inspection.manifest
    except CorruptCheckpointError as exc:
        logger.warning("treating %s as incomplete: %s", checkpoint.url, exc)
        status, manifest, error = CheckpointStatus.INCOMPLETE, None, str(exc)
    mtime: float | None = None
    if manifest is None:
        mtime = max((o.mtime for o in objects if o.mtime is not None), default=None)
    return CheckpointEntry(
        name=name,
        checkpoint_id=parse_checkpoint_id(name),
        status=status,
        timestamp=manifest.timestamp if manifest is not None else None,
        mtime=mtime,
        url=checkpoint.url,
        size_bytes=manifest.total_size if manifest is not None else None,
        error=error,
        manifest=manifest,
        objects=tuple(objects),
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
    return scan_checkpoints(resolve_storage(model_dir_or_storage, storage_options)).entries


@dataclass(frozen=True)
class CheckpointScan:
    """What one listing of ``<model_dir>/checkpoints/`` found.

    Attributes:
        entries: every ``checkpoint-*`` directory, oldest first.
        has_objects: whether ``checkpoints/`` holds any object at all.
    """

    entries: list[CheckpointEntry]
    has_objects: bool

    @property
    def latest_complete(self) -> CheckpointEntry | None:
        """The newest complete checkpoint, or None."""
        complete = [e for e in self.entries if e.is_complete]
        return complete[-1] if complete else None

    def next_checkpoint_id(self) -> int:
        """One past the highest checkpoint number (1 for an empty run)."""
        return max((e.checkpoint_id for e in self.entries if e.checkpoint_id is not None), default=0) + 1


def _list_groups(storage: Storage) -> tuple[dict[str, list[ObjectInfo]], bool]:
    """One listing of ``checkpoints/``: each checkpoint folder's objects, and whether anything is there."""
    groups: dict[str, list[ObjectInfo]] = {}
    objects = storage.list_objects(CHECKPOINTS_DIR)
    for info in objects:
        name, sep, rest = info.key.partition("/")
        if sep and rest and name.startswith(CHECKPOINT_PREFIX):
            groups.setdefault(name, []).append(dataclasses.replace(info, key=rest))
    return groups, bool(objects)


def scan_checkpoints(storage: Storage) -> CheckpointScan:
    """List and classify every ``checkpoints/checkpoint-*`` below ``storage`` in one listing.

    Requests: one paginated listing, plus one read per manifest this process
    has not read before; none per file.
    """
    groups, has_objects = _list_groups(storage)
    entries = [_entry(storage, name, group) for name, group in groups.items()]
    return CheckpointScan(sorted(entries, key=entry_sort_key), has_objects)


def _listed_time(objects: list[ObjectInfo]) -> float | None:
    """When the store says a folder was committed: its manifest's mtime, else its newest object's."""
    manifest = next((o for o in objects if o.key == MANIFEST_NAME), None)
    times = [manifest.mtime] if manifest is not None else [o.mtime for o in objects]
    return max((t for t in times if t is not None), default=None)


def _could_be_checkpoint(objects: list[ObjectInfo]) -> bool:
    """Whether the listing alone leaves room for a complete checkpoint (else nothing needs reading)."""
    keys = {o.key for o in objects}
    if MANIFEST_NAME in keys:
        return True
    return IN_PROGRESS_NAME not in keys and any(name in keys for name in WEIGHTS_NAMES)


def scan_latest_complete(storage: Storage) -> CheckpointScan:
    """Find the newest complete checkpoint reading as few manifests as possible.

    One listing of ``checkpoints/``; then folders are inspected newest first by
    the store's own modification time of their manifest, and the search stops
    as soon as the best complete checkpoint found has a manifest timestamp
    later than every remaining folder's modification time: a manifest's
    timestamp is taken before it is written, so no older-listed folder can hold
    a later one (unless the saver's clock ran ahead of the store's, in which
    case the store's order of commits is trusted). Resuming a run of any
    length thus reads one or two manifests.

    Returns:
        A scan whose entries are the folders that were inspected (so
        :attr:`CheckpointScan.latest_complete` is the answer), not every folder.
    """
    groups, has_objects = _list_groups(storage)
    candidates = sorted(
        ((_listed_time(objs), parse_checkpoint_id(name), name) for name, objs in groups.items() if _could_be_checkpoint(objs)),
        key=lambda c: (c[0] if c[0] is not None else float("inf"), c[1] if c[1] is not None else -1, c[2]),
        reverse=True,
    )
    inspected: list[CheckpointEntry] = []
    best: CheckpointEntry | None = None
    for listed_time, _, name in candidates:
        best_time = best.time if best is not None else None
        if best_time is not None and listed_time is not None and best_time.timestamp() > listed_time:
            break  # sorted newest first: every remaining folder is older still
        entry = _entry(storage, name, groups[name])
        inspected.append(entry)
        if entry.is_complete and (best is None or entry_sort_key(entry) > entry_sort_key(best)):
            best = entry
    return CheckpointScan(sorted(inspected, key=entry_sort_key), has_objects)


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
    scan = scan_latest_complete(storage)
    latest = scan.latest_complete
    if latest is not None:
        return join_location(model_dir, f"{CHECKPOINTS_DIR}/{latest.name}")
    if scan.has_objects:
        return None
    try:
        status = inspect_checkpoint(storage).status
    except CorruptCheckpointError as exc:
        logger.warning("%s is not a usable checkpoint: %s", storage.url, exc)
        return None
    return join_location(model_dir, "") if status is CheckpointStatus.COMPLETE else None
