"""Storage on any fsspec filesystem: S3, GCS, memory, and every other protocol.

Streaming writes to S3 and GCS upload several parts at once
(:mod:`ckptio.storage.multipart`, :mod:`ckptio.storage.object_uploads`): the
object appears only when the upload completes, and an aborted or killed
writer leaves nothing visible. Other filesystems spool the stream to a local
temporary file and upload it in one step on commit.

Listings bypass fsspec's directory cache (``use_listings_cache=False``, plus
an explicit invalidation before each listing), so a file written or deleted by
another process is seen at once.

Every request to an asynchronous filesystem (S3, GCS) is bounded by the stall
timeout (:mod:`ckptio.storage.stall`): a server that stops answering fails the
request instead of hanging it.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as _dt
import logging
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar

import fsspec

from ckptio.errors import ObjectExistsError, ObjectNotFoundError, StorageError
from ckptio.storage.base import (
    ObjectInfo,
    Storage,
    StreamWriter,
    is_temporary,
    normalize_key,
)
from ckptio.storage.multipart import ParallelUploadWriter, PartSink
from ckptio.storage.object_uploads import default_part_size, part_sink_for
from ckptio.storage.retry import (
    RetryPolicy,
    missing_bucket_error,
    raise_translated,
)
from ckptio.storage.stall import (
    DEFAULT_STALL_TIMEOUT_S,
    StallGuardSink,
    bounded,
    request_limit,
)

__all__ = ["FsspecStorage"]


def _unsatisfiable_range(exc: BaseException) -> bool:
    """Whether a backend refused a read because the range starts past the object's end (HTTP 416)."""
    return getattr(exc, "code", None) == 416 or "range is not satisfiable" in str(exc)

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: Parts of one object uploading at once (all writers share one memory budget besides).
PARTS_IN_FLIGHT = 8
#: Protocols served from this machine, where a request is not a network round trip.
_IN_PROCESS_PROTOCOLS = {"memory", "file", "local"}
_memory_create_lock = threading.Lock()


def _as_epoch(value: Any) -> float | None:
    """Seconds since the epoch from the many ways backends report modification times."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return float(value.timestamp())
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return _as_epoch(_dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


#: Listing/stat fields holding a modification time, and a version token, by backend.
_MTIME_FIELDS = ("LastModified", "updated", "mtime", "modified", "created")
_VERSION_FIELDS = ("ETag", "generation", "etag", "md5Hash")


def _object_info(key: str, details: dict[str, Any]) -> ObjectInfo:
    """An :class:`ObjectInfo` from an fsspec listing or ``info`` entry."""
    mtime = next((t for t in (_as_epoch(details.get(f)) for f in _MTIME_FIELDS) if t is not None), None)
    version = next((str(details[f]) for f in _VERSION_FIELDS if details.get(f) not in (None, "")), None)
    return ObjectInfo(key=key, size=int(details.get("size") or 0), mtime=mtime, version=version)


class _SpooledWriter(StreamWriter):
    """Spools to a local temporary file and uploads it in one step on commit."""

    def __init__(self, storage: FsspecStorage, key: str) -> None:
        super().__init__(storage.url_of(key))
        self._storage = storage
        self._key = key
        self._tmp: IO[bytes] = tempfile.TemporaryFile()

    def _write(self, data: memoryview) -> int:
        return self._tmp.write(data)

    def _commit(self) -> None:
        try:
            self._tmp.seek(0)
            self._storage.write_bytes(self._key, self._tmp.read())
        finally:
            self._tmp.close()

    def _abort(self) -> None:
        self._tmp.close()

    def _release(self) -> None:
        self._tmp.close()


class FsspecStorage(Storage):
    """A :class:`Storage` over an fsspec filesystem instance."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        *,
        protocol: str,
        block_size: int | None = None,
        retry: RetryPolicy | None = None,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        self.fs = fs
        self.protocol = protocol
        # Keep the filesystem's own form of the root ("bucket/run"; "/run" for memory).
        self._root = root.rstrip("/")
        self.block_size = block_size or default_part_size(protocol)
        #: Retries of one upload part (a whole-object retry would resend every part).
        self.part_retry = retry or RetryPolicy()
        #: Longest a request may go without an answer (see :mod:`ckptio.storage.stall`).
        self.stall_timeout_s = stall_timeout_s

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self._root.lstrip('/')}"

    @property
    def is_remote(self) -> bool:
        return self.protocol not in _IN_PROCESS_PROTOCOLS

    def _path(self, key: str) -> str:
        key = normalize_key(key)
        return f"{self._root}/{key}" if key else self._root

    def _call(self, key: str, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the one place backend errors are translated
            raise_translated(exc, self.url_of(key), action)

    def _op(self, key: str, action: str, method: str, *args: Any, nbytes: int | None = 0, **kwargs: Any) -> Any:
        """``fs.<method>(*args, **kwargs)``; on an asynchronous filesystem its coroutine runs bounded by
        :func:`~ckptio.storage.stall.request_limit` for ``nbytes`` (None: a read of unknown size, bounded
        by the client's read timeout alone)."""
        if not getattr(self.fs, "async_impl", False) or nbytes is None:
            return getattr(self.fs, method)(*args, **kwargs)
        request = getattr(self.fs, f"_{method}")(*args, **kwargs)
        limit = request_limit(self.stall_timeout_s, nbytes)
        cancel = action != "delete"  # a delete goes on after its caller stops waiting (see bounded)
        guarded = bounded(request, limit=limit, url=self.url_of(key), action=action, cancel=cancel)
        return asyncio.run_coroutine_threadsafe(guarded, self.fs.loop).result()

    def _raise_if_no_bucket(self, exc: FileNotFoundError, key: str) -> None:
        """A missing prefix lists as empty; a missing bucket is an error (never retried)."""
        missing = missing_bucket_error(exc, self.url_of(key), "list")
        if missing is not None:
            raise missing from exc

    def child(self, key: str) -> FsspecStorage:
        return FsspecStorage(
            self.fs,
            self._path(key),
            protocol=self.protocol,
            block_size=self.block_size,
            retry=self.part_retry,
            stall_timeout_s=self.stall_timeout_s,
        )

    # -- writing -----------------------------------------------------------
    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        payload = bytes(data)
        path = self._path(key)
        self._call(key, "write", lambda: self._op(key, "write", "pipe_file", path, payload, nbytes=len(payload)))

    def open_writer(self, key: str) -> StreamWriter:
        sink = self.part_sink(key)
        if sink is None:
            return _SpooledWriter(self, key)
        return ParallelUploadWriter(
            sink,
            self.url_of(key),
            self.fs.loop,
            part_size=self.block_size,
            max_in_flight=self.concurrency(PARTS_IN_FLIGHT),
            retry=self.part_retry,
        )

    def part_sink(self, key: str) -> PartSink | None:
        """How this backend uploads ``key`` in concurrent parts; None when it cannot."""
        sink = part_sink_for(self.protocol, self.fs, self._path(key))
        return None if sink is None else StallGuardSink(sink, self.url_of(key), self.stall_timeout_s)

    def create_exclusive(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def create() -> None:
            if self.protocol == "memory":
                with _memory_create_lock:  # the memory store is per process: a lock makes it exclusive
                    if self.fs.exists(path):
                        raise FileExistsError(path)
                    self.fs.pipe_file(path, data)
            else:
                try:
                    self._op(key, "create", "pipe_file", path, data, mode="create", nbytes=len(data))
                except (FileExistsError, StorageError):
                    raise
                except Exception:
                    # Some S3 servers answer 412 in a form s3fs does not map to
                    # FileExistsError: if the object is there now, ours was refused.
                    if self._op(key, "create", "exists", path):
                        raise FileExistsError(path) from None
                    raise

        try:
            self._call(key, "create", create)
        except ObjectExistsError:
            raise
        except FileExistsError as exc:
            raise ObjectExistsError(exc.errno, str(exc)) from exc

    # -- reading -----------------------------------------------------------
    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        path = self._path(key)
        if start is not None and end is not None and end <= start:
            return b""
        size = None if start is None or end is None else end - start

        def read() -> bytes:
            try:
                return bytes(self._op(key, "read", "cat_file", path, start=start, end=end, nbytes=size))
            except Exception as exc:
                # S3 (InvalidRange) and GCS (416) refuse the range "bytes=0-" of an empty object
                # instead of answering with no bytes: an empty object read from its start is empty.
                if start == 0 and end is None and _unsatisfiable_range(exc):
                    return b""
                raise

        return self._call(key, "read", read)

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        if not ranges:
            return []
        path = self._path(key)
        starts = [s for s, _ in ranges]
        ends = [e for _, e in ranges]

        def read() -> builtins.list[bytes]:
            size = sum(e - s for s, e in ranges)
            chunks = self._op(key, "read", "cat_ranges", [path] * len(ranges), starts, ends, on_error="raise", nbytes=size)
            for chunk in chunks:
                if isinstance(chunk, BaseException):
                    raise chunk
            return [bytes(c) for c in chunks]

        return self._call(key, "read", read)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return bool(self._call(key, "check", lambda: self._op(key, "check", "exists", path)))

    def is_file(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return bool(self._call(key, "check", lambda: self._op(key, "check", "isfile", path)))

    def info(self, key: str) -> ObjectInfo:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        details = self._call(key, "stat", lambda: self._op(key, "stat", "info", path))
        if details.get("type") == "directory":
            raise ObjectNotFoundError(2, f"cannot stat {self.url_of(key)!r}: not an object")
        return _object_info(normalize_key(key), details)

    def list(self, prefix: str = "") -> builtins.list[str]:
        path = self._path(prefix)
        self.fs.invalidate_cache(path)

        def ls() -> builtins.list[str]:
            try:
                entries = self._op(prefix, "list", "ls", path, detail=False, refresh=True)
            except FileNotFoundError as exc:
                self._raise_if_no_bucket(exc, prefix)
                return []
            names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
            names.discard("")
            # Some stores list a directory marker for the prefix itself.
            return sorted(n for n in names if f"{path}/{n}".strip("/") != path and not is_temporary(n))

        return self._call(prefix, "list", ls)

    def walk(self, prefix: str = "") -> builtins.list[str]:
        return [info.key for info in self.list_objects(prefix)]

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return [info for info in self._find(prefix) if not is_temporary(info.key)]

    def _find(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Every object below ``prefix``, in-flight temporaries included."""
        path = self._path(prefix)
        self.fs.invalidate_cache(path)

        def find() -> builtins.list[ObjectInfo]:
            try:
                # One recursive (delimiter-free) paginated listing; its entries carry sizes and times.
                found = self._op(prefix, "list", "find", path, withdirs=False, detail=True)
            except FileNotFoundError as exc:
                self._raise_if_no_bucket(exc, prefix)
                return []
            strip = len(path) + 1 if path else 0
            infos = [
                _object_info(str(p)[strip:], details)
                for p, details in found.items()
                if str(p) != path and details.get("type") != "directory"
            ]
            return sorted(infos, key=lambda info: info.key)

        return self._call(prefix, "list", find)

    # -- deleting ----------------------------------------------------------
    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        path = self._path(key)

        def rm() -> None:
            # Object stores delete missing keys silently: check first when the caller cares.
            if not missing_ok and not self._op(key, "delete", "exists", path):
                raise FileNotFoundError(path)
            try:
                self._op(key, "delete", "rm_file", path)
            except FileNotFoundError:
                if not missing_ok:
                    raise
            self.fs.invalidate_cache(path)

        self._call(key, "delete", rm)

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        paths = [self._path(k) for k in keys]

        def rm() -> None:
            # s3fs and gcsfs send a list to their batch delete (up to 1,000 keys per request).
            try:
                self._op(keys[0], "delete", "rm", paths)
            except FileNotFoundError:
                pass
            for path in paths:
                self.fs.invalidate_cache(path)

        self._call(keys[0] if len(keys) == 1 else "", "delete", rm)

    def delete_prefix(self, prefix: str) -> None:
        keys = [info.key for info in self._find(prefix)]  # a killed writer's upload parts go too
        if keys:
            self.delete_many([f"{prefix}/{k}" if prefix else k for k in keys])
