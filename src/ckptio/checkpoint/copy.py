"""Copy a checkpoint directory to another storage: resumable, parallel, manifest last.

:func:`copy_checkpoint` (what ``ckptio cp`` runs) publishes like a save
(:mod:`ckptio.checkpoint.commit`): the in-progress marker first, data files,
shard indexes, the manifest last, then the marker goes. Streamed objects are
checked against the source manifest's size and CRC32C before they are
published, so a corrupt source never yields a complete copy. At every instant
the destination ``DST`` is complete with its old content, incomplete (marker,
no manifest), or complete with the new content; never a manifest over files
of two checkpoints:

* **Resuming.** A re-run writes only what is missing or differs. An object at
  ``DST`` with the source's size is reused when its CRC32C, read back, is the
  manifest's, or without reading it when it was published after this copy's
  marker: the marker names the source content, its listed modification time
  and the object's come from the same store, and since then only this copy,
  which publishes an object atomically and only once checked, wrote there.
  A marker naming other content starts a new copy.
* **Overwriting a committed checkpoint.** Names are kept, so the old
  checkpoint cannot stay valid once a file it lists changes. Instead: the
  marker is written (the old manifest still wins); files the old manifest
  does not list are written; only if one it lists must change is the old
  manifest deleted (now incomplete) and those files replaced; the new
  manifest is written (replacing the old one atomically when nothing it
  lists changed), the marker removed, and files the new checkpoint lacks
  deleted. Identical content is never rewritten.
* **One store** (one fsspec filesystem, same options: an S3 endpoint, a GCS
  project, ``memory://``): the store copies each object itself (S3
  CopyObject, GCS rewrite). Such a copy is checked by size before the commit
  but its CRC32C is not recomputed (``ckptio verify`` reads it back).
  Storages wrapped in anything but retries (fault injection, counting) always
  stream, so the wrapper sees what happens.
* Several objects move at once, as many as the faster end's
  :meth:`~ckptio.storage.Storage.concurrency` allows (one on local disk).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ckptio.checkpoint.layout import IN_PROGRESS_NAME, MANIFEST_NAME
from ckptio.checkpoint.manifest import utc_timestamp
from ckptio.checkpoint.validate import CheckpointStatus, inspect_checkpoint
from ckptio.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ObjectNotFoundError,
)
from ckptio.storage import ObjectInfo, RetryingStorage, Storage, resolve_storage
from ckptio.storage.integrity import Crc32c, checksum_bytes
from ckptio.storage.progress import ProgressCallback, ProgressEvent
from ckptio.storage.retry import call_with_retries
from ckptio.storage.transfer import map_concurrently
from ckptio.storage.wrapper import retry_policy_of

if TYPE_CHECKING:
    from ckptio.storage.fsspec_backend import FsspecStorage

__all__ = ["COPY_CHUNK", "CopyProgress", "CopyResult", "copy_checkpoint", "copy_object", "copy_order"]

logger = logging.getLogger(__name__)

#: Bytes read per ranged request when streaming an object.
COPY_CHUNK = 8 * 1024 * 1024
#: Objects in flight at once on remote storage.
_FILE_CONCURRENCY = 8


class CopyProgress(Protocol):
    """Told how many bytes a copy will move, then each time some moved (from several threads)."""

    def start(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


class _CallbackProgress:
    """A :class:`CopyProgress` that tells a :data:`~ckptio.storage.ProgressCallback` the bytes copied so far."""

    def __init__(self, callback: ProgressCallback, url: str) -> None:
        self.callback, self.url = callback, url
        self.total: int | None = None
        self.done = 0
        self._lock = threading.Lock()

    def start(self, total_bytes: int) -> None:
        self.total = total_bytes

    def advance(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            self.done += nbytes
            self.callback(ProgressEvent("copy", self.url, self.done, self.total))


def _as_copy_progress(progress: CopyProgress | ProgressCallback | None, url: str) -> CopyProgress | None:
    if progress is None or hasattr(progress, "advance"):
        return progress  # type: ignore[return-value]
    return _CallbackProgress(progress, url)


@dataclass(frozen=True)
class CopyResult:
    """What :func:`copy_checkpoint` did: the destination URL, objects written there (``copied``, the
    manifest included when written; ``server_side`` among them), objects already right and left alone
    (``reused``), objects of a previous checkpoint deleted after the commit, and byte counts."""

    url: str
    copied: tuple[str, ...]
    reused: tuple[str, ...]
    server_side: tuple[str, ...]
    deleted: tuple[str, ...]
    bytes_copied: int
    total_bytes: int


def _rank(key: str) -> int:
    if key == MANIFEST_NAME:
        return 2
    return 1 if key.endswith(".index.json") else 0


def copy_order(keys: list[str]) -> list[str]:
    """Order keys for copying: data first, then indexes, the manifest last; skip the in-progress marker.

    A destination interrupted mid-copy therefore never looks complete.
    """
    kept = [k for k in keys if k != IN_PROGRESS_NAME]
    return sorted(kept, key=lambda k: (_rank(k), k))


def copy_object(
    src: Storage,
    dst: Storage,
    key: str,
    expected_crc: str | None,
    update: Callable[[int], object] | None = None,
    *,
    size: int | None = None,
) -> int:
    """Stream ``key`` from ``src`` to ``dst`` in ranged chunks, publishing it only once its size and
    (when given) its CRC32C check out; ``update`` hears each chunk's size, ``size`` saves a stat.
    Return the bytes copied.

    Raises:
        CorruptCheckpointError: the bytes do not match ``expected_crc`` or the
            object changed size; nothing is published at ``dst``.
    """
    if size is None:
        size = src.size(key)
    crc = Crc32c()
    with dst.open_writer(key) as writer:
        for start in range(0, size, COPY_CHUNK):
            chunk = src.read_bytes(key, start, min(size, start + COPY_CHUNK))
            if len(chunk) != min(COPY_CHUNK, size - start):
                raise CorruptCheckpointError(f"{src.url_of(key)} changed size during the copy; destination not published")
            crc.update(chunk)
            writer.write(chunk)
            if update is not None:
                update(len(chunk))
        got = crc.hexdigest()  # checked before commit so a bad copy is never published
        if expected_crc is not None and got != expected_crc:
            raise CorruptCheckpointError(
                f"{src.url_of(key)} does not match its manifest (CRC32C expected {expected_crc}, got {got});"
                f" {dst.url_of(key)} was not written"
            )
    return size


def _fsspec_backend(storage: Storage) -> FsspecStorage | None:
    """The fsspec backend under ``storage`` when only retry layers wrap it, else None."""
    from ckptio.storage.fsspec_backend import FsspecStorage

    current = storage
    while isinstance(current, RetryingStorage):
        current = current.inner
    return current if isinstance(current, FsspecStorage) else None


def server_side_copier(src: Storage, dst: Storage) -> Callable[[str], None] | None:
    """A function copying one key from ``src`` to ``dst`` inside the store, or None when they differ.

    Both must be fsspec storages (behind retries at most) on one filesystem:
    the same protocol and options, so the same credentials reach both ends.
    The store publishes the copy atomically (S3 CopyObject, GCS rewrite).
    """
    a, b = _fsspec_backend(src), _fsspec_backend(dst)
    if a is None or b is None or a.protocol != b.protocol or not (a.fs is b.fs or a.fs == b.fs):
        return None
    fs, policy = b.fs, retry_policy_of(dst)

    def copy(key: str) -> None:
        source, target = a._path(key), b._path(key)

        def run() -> None:
            fs.cp_file(source, target)
            fs.invalidate_cache(target)

        call_with_retries(run, url=dst.url_of(key), action=f"copy {src.url_of(key)!r} to", policy=policy)

    return copy


def _check_apart(src: Storage, dst: Storage) -> None:
    a, b = src.url.rstrip("/") + "/", dst.url.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise InvalidArgumentError(f"source {src.url} and destination {dst.url} overlap; nothing copied")


def _job_id(objects: dict[str, ObjectInfo], keys: list[str], manifest_bytes: bytes | None) -> str:
    """Names the source content a marker was written for: the manifest bytes and every key and size."""
    listing = json.dumps([[k, objects[k].size] for k in keys]).encode()
    return checksum_bytes(listing + (manifest_bytes or b""))


def _marker(source_url: str, job: str) -> bytes:
    started, host = utc_timestamp(), socket.gethostname()
    marker = {"action": "copy", "source": source_url, "job": job, "started": started, "host": host, "pid": os.getpid()}
    return (json.dumps(marker, indent=2) + "\n").encode()


def _marker_job(dst: Storage) -> str | None:
    """The job named by the copy marker at ``dst``, None for any other marker (a save's, a delete's)."""
    try:
        marker = json.loads(dst.read_bytes(IN_PROGRESS_NAME))
    except (ObjectNotFoundError, ValueError):
        return None
    job = marker.get("job") if isinstance(marker, dict) and marker.get("action") == "copy" else None
    return job if isinstance(job, str) else None


def _crc_of(storage: Storage, key: str, size: int) -> str | None:
    crc = Crc32c()
    try:
        for start in range(0, size, COPY_CHUNK):
            crc.update(storage.read_bytes(key, start, min(size, start + COPY_CHUNK)))
    except ObjectNotFoundError:
        return None
    return crc.hexdigest()


def _protected(dst: Storage, existing: dict[str, ObjectInfo], has_manifest: bool) -> set[str]:
    """Files that may change only once the manifest at ``dst`` is gone: those it lists."""
    if MANIFEST_NAME not in existing:
        return set()
    if not has_manifest:
        return set(existing)  # a plain directory replaces a checkpoint: uncommit before any write
    try:
        old = inspect_checkpoint(dst, objects=existing.values()).manifest
    except CorruptCheckpointError:
        return set()  # a malformed manifest validates nothing
    return {r.path for r in old.files} if old is not None else set()


@dataclass
class _Plan:
    """What a copy writes, and what it leaves as already right."""

    to_copy: list[str]
    reused: list[str]
    write_manifest: bool


class _CopyJob:
    """One run of :func:`copy_checkpoint`, from a complete source to a destination it may take."""

    def __init__(self, source: Storage, target: Storage, progress: CopyProgress | None, server_side: bool) -> None:
        inspection = inspect_checkpoint(source)
        if inspection.status is not CheckpointStatus.COMPLETE:
            why = "; ".join(inspection.problems) or inspection.status.value
            raise IncompleteCheckpointError(f"{source.url} is not a complete checkpoint ({why}); nothing copied")
        self.source, self.target, self.progress = source, target, progress
        self.objects = inspection.objects
        self.keys = [k for k in copy_order(inspection.keys) if k != MANIFEST_NAME]
        manifest = inspection.manifest
        self.manifest_bytes = source.read_bytes(MANIFEST_NAME) if manifest is not None else None
        self.crcs = {r.path: r.crc32c for r in manifest.files} if manifest is not None else {}
        self.job = _job_id(self.objects, self.keys, self.manifest_bytes)
        self.workers = max(source.concurrency(_FILE_CONCURRENCY), target.concurrency(_FILE_CONCURRENCY))
        self.server = server_side_copier(source, target) if server_side else None
        self.by_server: list[str] = []

    def claim(self, overwrite: bool) -> dict[str, ObjectInfo]:
        """Refuse a destination that is not ours to write, mark it, and return what it held (marker aside)."""
        existing = {o.key: o for o in self.target.list_objects("")}
        marker = existing.pop(IN_PROGRESS_NAME, None)
        self.resuming = marker is not None and _marker_job(self.target) == self.job
        if existing and not overwrite and (MANIFEST_NAME in existing or not self.resuming):
            raise CheckpointExistsError(
                f"{self.target.url} already holds {len(existing)} files; pass overwrite=True (--overwrite) to "
                "replace them; nothing was copied"
            )
        if self.resuming and marker is not None:
            self.anchor = marker.mtime  # objects published after it were published by this copy
        else:
            self.target.write_bytes(IN_PROGRESS_NAME, _marker(self.source.url, self.job))
            self.anchor = self.target.info(IN_PROGRESS_NAME).mtime
        return existing

    def _trusted(self, info: ObjectInfo) -> bool:
        return self.resuming and self.anchor is not None and info.mtime is not None and info.mtime > self.anchor

    def plan(self, existing: dict[str, ObjectInfo]) -> _Plan:
        """Reuse what is already right at the destination (trusted, or read back); copy the rest."""
        to_copy: list[str] = []
        to_check: list[str] = []
        reused: list[str] = []
        for key in self.keys:
            found = existing.get(key)
            if found is None or found.size != self.objects[key].size:
                to_copy.append(key)
            elif self._trusted(found):
                reused.append(key)
            else:  # without a checksum to compare with (a file the manifest does not list), copy it
                (to_check if key in self.crcs else to_copy).append(key)
        checked = map_concurrently(
            lambda k: _crc_of(self.target, k, self.objects[k].size), to_check, workers=self.workers
        )
        for key, crc in zip(to_check, checked):
            (reused if crc == self.crcs[key] else to_copy).append(key)
        manifest = self.manifest_bytes
        same_manifest = (
            manifest is not None
            and MANIFEST_NAME in existing
            and existing[MANIFEST_NAME].size == len(manifest)
            and self.target.read_bytes(MANIFEST_NAME) == manifest
        )
        return _Plan(to_copy, reused, write_manifest=manifest is not None and not same_manifest)

    def _advance(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.advance(nbytes)

    def _copy_one(self, key: str) -> None:
        size = self.objects[key].size
        if self.server is not None:
            try:
                self.server(key)
            except NotImplementedError:  # a store without server-side copy (GCS zonal buckets): stream
                pass
            else:
                self.by_server.append(key)
                self._advance(size)
                return
        copy_object(self.source, self.target, key, self.crcs.get(key), self._advance, size=size)

    def transfer(self, batch: Sequence[str]) -> None:
        """Copy ``batch``, several objects at once: data first, then indexes."""
        for rank in (0, 1):
            group = [k for k in batch if _rank(k) == rank]
            map_concurrently(self._copy_one, group, workers=self.workers, thread_name="ckptio-copy")

    def commit(self, plan: _Plan, existing: dict[str, ObjectInfo]) -> list[str]:
        """Check every size, publish the manifest, drop the marker, then delete what the old checkpoint
        had and the new one lacks; return those deleted."""
        listed = {o.key: o.size for o in self.target.list_objects("")}
        wrong = [k for k in self.keys if listed.get(k) != self.objects[k].size]
        if wrong:
            raise CorruptCheckpointError(
                f"cannot commit the copy at {self.target.url}: {len(wrong)} objects are missing or have the wrong "
                f"size ({', '.join(wrong[:3])}); it is left incomplete, run the copy again"
            )
        if self.manifest_bytes is not None and plan.write_manifest:
            self.target.write_bytes(MANIFEST_NAME, self.manifest_bytes)
            self._advance(len(self.manifest_bytes))
        elif self.manifest_bytes is None and MANIFEST_NAME in existing:
            self.target.delete(MANIFEST_NAME)  # a model directory has none; an old one describes other files
        self.target.delete(IN_PROGRESS_NAME)
        stale = sorted(set(existing) - set(self.keys) - {MANIFEST_NAME})
        if stale:
            self.target.delete_many(stale)
        return stale


def copy_checkpoint(
    src: str | os.PathLike[str] | Storage,
    dst: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: CopyProgress | ProgressCallback | None = None,
    server_side: bool = True,
) -> CopyResult:
    """Copy a complete checkpoint (or model directory) to ``dst``, manifest last; resume an interrupted copy.

    See the module docstring for what ``dst`` looks like at every instant.

    Args:
        src: the checkpoint directory (path, URL or Storage).
        dst: the destination directory.
        storage_options: fsspec options for ``src`` (and ``dst``, unless given).
        dst_storage_options: fsspec options for ``dst``.
        overwrite: replace what ``dst`` holds (needed unless ``dst`` is empty or
            holds an interrupted copy of this same checkpoint with no manifest yet).
        progress: a :data:`~ckptio.storage.ProgressCallback`, told the bytes copied so far
            (operation ``"copy"``, the total to copy, manifest included); or a
            :class:`CopyProgress`, told the total, then each chunk moved.
        server_side: let the store copy objects itself when both ends are on it.

    Raises:
        IncompleteCheckpointError: ``src`` is not complete; nothing is written.
        CheckpointExistsError: ``dst`` holds something and ``overwrite`` is False; nothing is written.
        InvalidArgumentError: ``src`` and ``dst`` overlap; nothing is written.
        CorruptCheckpointError: a source object does not match its manifest;
            ``dst`` is left as described above (never complete with mixed content).
        StorageError: a backend failure; the same holds.
    """
    started = time.monotonic()
    source = resolve_storage(src, storage_options)
    target = resolve_storage(dst, storage_options if dst_storage_options is None else dst_storage_options)
    _check_apart(source, target)
    progress = _as_copy_progress(progress, target.url)
    job = _CopyJob(source, target, progress, server_side)
    existing = job.claim(overwrite)
    protected = _protected(target, existing, job.manifest_bytes is not None)
    plan = job.plan(existing)
    total = sum(job.objects[k].size for k in plan.to_copy) + (len(job.manifest_bytes or b"") * plan.write_manifest)
    if progress is not None:
        progress.start(total)
    job.transfer([k for k in plan.to_copy if k not in protected])  # the old manifest does not see these
    replaced = [k for k in plan.to_copy if k in protected]
    if replaced:
        target.delete(MANIFEST_NAME)  # the marker is there: DST reads as incomplete from now on
        logger.info("uncommitted %s: %d files of its old checkpoint change", target.url, len(replaced))
        job.transfer(replaced)
    stale = job.commit(plan, existing)
    copied = [*plan.to_copy, *([MANIFEST_NAME] if plan.write_manifest else [])]
    seconds = time.monotonic() - started
    logger.info(
        "copied %s to %s: %d objects, %d bytes (%d server-side), %d reused, %d stale deleted, in %.2fs",
        *(source.url, target.url, len(copied), total, len(job.by_server), len(plan.reused), len(stale), seconds),
    )
    return CopyResult(
        url=target.url,
        copied=tuple(copied),
        reused=tuple(sorted(plan.reused)),
        server_side=tuple(sorted(job.by_server)),
        deleted=tuple(stale),
        bytes_copied=total,
        total_bytes=sum(job.objects[k].size for k in job.keys) + len(job.manifest_bytes or b""),
    )
