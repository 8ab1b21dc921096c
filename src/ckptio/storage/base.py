"""The byte-oriented storage interface every other layer of ckptio is built on.

A :class:`Storage` is rooted at a URL (``s3://bucket/run``) or a local
directory; every method takes a *key* relative to that root, written with ``/``
whatever the platform (see :func:`join`). Keys never escape the root.

Guarantees every backend keeps:

* Writes are atomic per object: a reader sees the old object or the new one,
  never a partial one. :meth:`Storage.write_bytes` publishes in one step;
  :meth:`Storage.open_writer` streams and publishes only on a successful
  ``commit`` (a multipart upload on object stores, a temp file renamed into
  place on local disk), leaving nothing visible if the writer fails or the
  process dies.
* Listings are read from the backend each time, never from a cache, and
  carry what the backend already returns with them (size, modification
  time, a version token): :meth:`Storage.list_objects` answers "which
  objects, how big" for a whole tree in one paginated listing, with no
  request per object.
* Failures surface as :mod:`ckptio.errors` exceptions naming the full URL.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from ckptio.errors import InvalidArgumentError
from ckptio.storage.transfer import map_concurrently

__all__ = ["TEMP_PREFIX", "ObjectInfo", "Storage", "StreamWriter", "is_temporary", "join", "normalize_key"]

#: Name prefix of objects that exist only while a write is in flight (never listed).
TEMP_PREFIX = ".ckptio-tmp-"


def is_temporary(key: str) -> bool:
    """Whether ``key`` names an in-flight temporary object (a temp file, an upload part)."""
    return key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)


def join(*parts: str) -> str:
    """Join key parts with ``/`` (never ``os.path.join``), dropping empty parts."""
    cleaned = [p.strip("/") for p in parts if p and p.strip("/")]
    return "/".join(cleaned)


def normalize_key(key: str) -> str:
    """Return ``key`` in canonical form, refusing keys that leave the root.

    Raises:
        InvalidArgumentError: the key is absolute, has a scheme, or climbs out
            of the root with ``..``.
    """
    if "://" in key:
        raise InvalidArgumentError(f"storage key {key!r} must be relative, not a URL")
    if key.startswith("/") or "\\" in key:
        raise InvalidArgumentError(f"storage key {key!r} must be a relative POSIX key")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgumentError(f"storage key {key!r} must not contain '..'")
    return "/".join(parts)


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a stat tells about one object.

    Attributes:
        key: the object's key (relative to whatever was listed or stat'ed).
        size: size in bytes.
        mtime: modification time, seconds since the epoch (UTC), where the backend gives one.
        version: a token that changes whenever the object is rewritten (S3 ETag,
            GCS generation, local inode and nanosecond mtime), where the backend gives one.
    """

    key: str
    size: int
    mtime: float | None
    version: str | None = None

    def identity(self) -> tuple[int, float | None, str | None] | None:
        """``(size, mtime, version)`` when it pins down one write of the object, else None."""
        if self.mtime is None and self.version is None:
            return None
        return (self.size, self.mtime, self.version)


class StreamWriter(ABC):
    """A streaming writer that publishes its object only on :meth:`commit`.

    Used as a context manager it commits on a clean exit and aborts when the
    block raises, so a failed write never leaves a visible object and never
    disturbs the previous object of that name.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.bytes_written = 0
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; nothing is visible to readers until :meth:`commit`."""
        if self._closed:
            raise ValueError(f"write to closed writer for {self.url}")
        n = self._write(memoryview(data).cast("B"))
        self.bytes_written += n
        return n

    def commit(self) -> None:
        """Publish the object atomically. Raises if publishing failed; nothing is published then."""
        if self._closed:
            return
        self._closed = True
        self._commit()

    def abort(self) -> None:
        """Discard everything written. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._abort()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._release()

    def _release(self) -> None:
        """Free local resources of an abandoned writer without publishing anything.

        Runs when a writer is garbage collected neither committed nor aborted
        (a simulated crash, or a bug): the object is not published, and what
        is left behind is what a killed process would leave.
        """

    @abstractmethod
    def _write(self, data: memoryview) -> int: ...

    @abstractmethod
    def _commit(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Storage(ABC):
    """A root URL and byte-level operations on the objects below it."""

    #: fsspec protocol of the backend ("file", "s3", "gcs", "memory", ...).
    protocol: str

    @property
    @abstractmethod
    def url(self) -> str:
        """The root URL (or local path) this storage is rooted at."""

    def url_of(self, key: str) -> str:
        """Full URL of ``key``, for messages and for reopening elsewhere."""
        key = normalize_key(key)
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    @abstractmethod
    def child(self, key: str) -> Storage:
        """A storage rooted at ``key`` below this one, sharing the same connection."""

    # -- writing -----------------------------------------------------------
    @abstractmethod
    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write a whole object atomically, replacing any previous one."""

    @abstractmethod
    def open_writer(self, key: str) -> StreamWriter:
        """Open a streaming writer that publishes ``key`` only on commit."""

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> None:
        """Write ``key`` only if it does not exist yet.

        Raises:
            ObjectExistsError: the object already exists.
        """

    # -- reading -----------------------------------------------------------
    @abstractmethod
    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Read a whole object, or the byte range ``[start, end)`` of it.

        Raises:
            ObjectNotFoundError: the object does not exist.
        """

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        """Read several ``[start, end)`` ranges of one object, concurrently where it helps."""
        return map_concurrently(lambda r: self.read_bytes(key, r[0], r[1]), ranges, workers=self.concurrency(8))

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object ``key`` exists (prefixes with objects below count too)."""

    @abstractmethod
    def is_file(self, key: str) -> bool:
        """Whether ``key`` is an object (not a prefix)."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo:
        """Size and modification time of object ``key``.

        Raises:
            ObjectNotFoundError: the object does not exist.
        """

    def size(self, key: str) -> int:
        """Size in bytes of object ``key``."""
        return self.info(key).size

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Names of the immediate children (objects and sub-prefixes) of ``prefix``, sorted.

        A missing prefix lists as empty. In-flight temporary objects are never listed.
        """

    @abstractmethod
    def walk(self, prefix: str = "") -> builtins.list[str]:
        """Keys of every object below ``prefix``, relative to ``prefix``, sorted."""

    @abstractmethod
    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        """Every object below ``prefix`` with its size, mtime and version, keys relative, sorted.

        One (paginated) listing request on object stores: never a request per object.
        A missing prefix lists as empty.
        """

    # -- deleting ----------------------------------------------------------
    @abstractmethod
    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        """Delete one object."""

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete several objects (missing ones are ignored), in batches where the backend has a
        batch delete (S3 DeleteObjects, GCS batch requests)."""
        for key in keys:
            self.delete(key, missing_ok=True)

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object below ``prefix`` (the prefix itself included on local disk)."""

    # -- what kind of backend ------------------------------------------------
    @property
    def is_remote(self) -> bool:
        """Whether each operation is a network round trip (object stores), worth overlapping."""
        return False

    def concurrency(self, wanted: int) -> int:
        """How many requests to keep in flight when up to ``wanted`` would help: ``wanted``
        on remote backends, 1 on local disk and in memory, where overlapping gains nothing."""
        return max(1, wanted) if self.is_remote else 1

    # -- local access ------------------------------------------------------
    def local_path(self, key: str = "") -> str | None:
        """The real file path of ``key`` when it lives on local disk, else None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
