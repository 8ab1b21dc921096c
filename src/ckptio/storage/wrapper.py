"""Storage wrappers: delegation, retries, and byte counting.

:class:`StorageWrapper` forwards every operation to an inner storage;
subclasses override the few they change. :func:`~ckptio.storage.open_storage`
wraps object-store backends in :class:`RetryingStorage`;
:class:`CountingStorage` counts operations and bytes (useful to prove that a
read fetched only what it needed).
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import errno
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from ckptio.errors import ObjectNotFoundError
from ckptio.storage.base import ObjectInfo, Storage, StreamWriter, normalize_key
from ckptio.storage.retry import (
    RetryPolicy,
    call_with_retries,
    raise_translated,
)

__all__ = [
    "CountingStorage",
    "KnownObjectsStorage",
    "RetryingStorage",
    "StorageWrapper",
    "retry_policy_of",
    "retrying_storage_of",
    "with_retries",
]

T = TypeVar("T")


class StorageWrapper(Storage):
    """A storage that forwards everything to ``inner``."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.protocol = inner.protocol

    @property
    def url(self) -> str:
        return self.inner.url

    def rewrap(self, inner: Storage) -> StorageWrapper:
        """A wrapper of the same kind and settings around ``inner`` (used by :meth:`child`)."""
        return type(self)(inner)

    def child(self, key: str) -> Storage:
        return self.rewrap(self.inner.child(key))

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.inner.write_bytes(key, data)

    def open_writer(self, key: str) -> StreamWriter:
        return self.inner.open_writer(key)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self.inner.create_exclusive(key, data)

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.inner.read_bytes(key, start, end)

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        return self.inner.read_ranges(key, ranges)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def is_file(self, key: str) -> bool:
        return self.inner.is_file(key)

    def info(self, key: str) -> ObjectInfo:
        return self.inner.info(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self.inner.list(prefix)

    def walk(self, prefix: str = "") -> builtins.list[str]:
        return self.inner.walk(prefix)

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return self.inner.list_objects(prefix)

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        self.inner.delete(key, missing_ok=missing_ok)

    def delete_many(self, keys: Sequence[str]) -> None:
        self.inner.delete_many(keys)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def local_path(self, key: str = "") -> str | None:
        return self.inner.local_path(key)

    @property
    def is_remote(self) -> bool:
        return self.inner.is_remote


class _TranslatingWriter(StreamWriter):
    """Raises what the inner writer raises as a :mod:`ckptio.errors` error naming the object's URL.

    A stream cannot be retried part by part from here; a transient failure
    surfaces as a (retryable) ``TransientStorageError`` so that the caller
    can write the whole object again (:func:`ckptio.format.writer.write_with_retries`).
    """

    def __init__(self, inner: StreamWriter) -> None:
        super().__init__(inner.url)
        #: The backend's writer.
        self.inner = inner

    def _write(self, data: memoryview) -> int:
        try:
            return self.inner.write(data)
        except Exception as exc:  # noqa: BLE001 - translated, chained
            raise_translated(exc, self.url, "write")

    def _commit(self) -> None:
        try:
            self.inner.commit()
        except Exception as exc:  # noqa: BLE001 - translated, chained
            raise_translated(exc, self.url, "publish")

    def _abort(self) -> None:
        self.inner.abort()


class RetryingStorage(StorageWrapper):
    """Retries transient failures of every whole operation under a :class:`RetryPolicy`.

    Streaming writers are not retried part by part: a failed stream is aborted
    (nothing is published) and the error reaches the caller as a ckptio error
    (a transient one stays retryable), who may write the object again.

    ``retries`` counts the retries made through this wrapper and its children.
    """

    def __init__(
        self, inner: Storage, policy: RetryPolicy | None = None, *, _root: RetryingStorage | None = None
    ) -> None:
        super().__init__(inner)
        self.policy = policy or RetryPolicy()
        self._root = _root
        self._lock = threading.Lock()
        self._retries = 0

    def rewrap(self, inner: Storage) -> RetryingStorage:
        return RetryingStorage(inner, self.policy, _root=self._counter())

    def _counter(self) -> RetryingStorage:
        return self._root._counter() if self._root is not None else self

    @property
    def retries(self) -> int:
        """Retries made so far through this wrapper and its children (whole-object rewrites included)."""
        return self._counter()._retries

    def count_retry(self) -> None:
        """Record one retry (called by every retry loop that uses this wrapper's policy)."""
        root = self._counter()
        with root._lock:
            root._retries += 1

    def _retry(self, key: str, action: str, fn: Callable[[], T]) -> T:
        return call_with_retries(
            fn, url=self.url_of(key), action=action, policy=self.policy, on_retry=self.count_retry
        )

    def open_writer(self, key: str) -> StreamWriter:
        return _TranslatingWriter(self._retry(key, "open writer for", lambda: self.inner.open_writer(key)))

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._retry(key, "write", lambda: self.inner.write_bytes(key, data))

    def create_exclusive(self, key: str, data: bytes) -> None:
        self._retry(key, "create", lambda: self.inner.create_exclusive(key, data))

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._retry(key, "read", lambda: self.inner.read_bytes(key, start, end))

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        return self._retry(key, "read", lambda: self.inner.read_ranges(key, ranges))

    def exists(self, key: str) -> bool:
        return self._retry(key, "check", lambda: self.inner.exists(key))

    def is_file(self, key: str) -> bool:
        return self._retry(key, "check", lambda: self.inner.is_file(key))

    def info(self, key: str) -> ObjectInfo:
        return self._retry(key, "stat", lambda: self.inner.info(key))

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self._retry(prefix, "list", lambda: self.inner.list(prefix))

    def walk(self, prefix: str = "") -> builtins.list[str]:
        return self._retry(prefix, "list", lambda: self.inner.walk(prefix))

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return self._retry(prefix, "list", lambda: self.inner.list_objects(prefix))

    def delete_many(self, keys: Sequence[str]) -> None:
        self._retry(keys[0] if keys else "", "delete", lambda: self.inner.delete_many(keys))

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        self._retry(key, "delete", lambda: self.inner.delete(key, missing_ok=missing_ok))

    def delete_prefix(self, prefix: str) -> None:
        self._retry(prefix, "delete", lambda: self.inner.delete_prefix(prefix))


def retrying_storage_of(storage: Storage) -> RetryingStorage | None:
    """The outermost :class:`RetryingStorage` among ``storage``'s wrappers, or None."""
    current: Storage | None = storage
    while isinstance(current, StorageWrapper):
        if isinstance(current, RetryingStorage):
            return current
        current = current.inner
    return None


def retry_policy_of(storage: Storage) -> RetryPolicy:
    """The policy of the outermost :class:`RetryingStorage` in ``storage``'s wrappers, else the default."""
    found = retrying_storage_of(storage)
    return found.policy if found is not None else RetryPolicy()


def with_retries(storage: Storage, policy: RetryPolicy | None = None) -> RetryingStorage:
    """``storage`` itself when its outermost layer retries, else ``storage`` wrapped in a :class:`RetryingStorage`.

    Faults raised by a wrapper *around* a retrying backend (a
    :class:`~ckptio.storage.FaultInjectingStorage` around ``open_storage(...)``)
    would otherwise reach the caller unretried. The new wrapper uses
    ``policy``, else the policy of a retrying layer inside, else the default.
    Errors whose retries an inner layer already spent are not retried again.
    """
    if isinstance(storage, RetryingStorage) and (policy is None or policy == storage.policy):
        return storage
    return RetryingStorage(storage, policy or retry_policy_of(storage))


class _CountingWriter(StreamWriter):
    def __init__(self, inner: StreamWriter, counter: CountingStorage) -> None:
        super().__init__(inner.url)
        self._inner = inner
        self._counter = counter

    def _write(self, data: memoryview) -> int:
        n = self._inner.write(data)
        self._counter.add(written=n)
        return n

    def _commit(self) -> None:
        self._counter.count("commit")
        self._inner.commit()

    def _abort(self) -> None:
        self._inner.abort()


class CountingStorage(StorageWrapper):
    """Counts requests by kind, and bytes moved, through it (children share the counters).

    ``requests`` maps a kind to how many calls of it went through: ``list``
    (one listing, however many pages), ``stat`` (``info``), ``exists``
    (``exists``/``is_file``), ``read``, ``write``, ``open`` and ``commit`` (a
    streaming writer), ``create``, ``delete`` (one object), ``delete_many``
    (one batch). Useful to prove that an operation costs what it should: a
    read that fetched only what it needed, a save that issued no per-file stat.
    """

    def __init__(self, inner: Storage, *, _shared: CountingStorage | None = None) -> None:
        super().__init__(inner)
        self._shared = _shared
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0
        self.operations = 0
        self.requests: collections.Counter[str] = collections.Counter()

    def rewrap(self, inner: Storage) -> CountingStorage:
        return CountingStorage(inner, _shared=self._root_counter())

    def _root_counter(self) -> CountingStorage:
        return self._shared._root_counter() if self._shared else self

    def add(self, *, read: int = 0, written: int = 0) -> None:
        """Record bytes moved by a read or a write (one operation)."""
        root = self._root_counter()
        with root._lock:
            root.operations += 1
            root.bytes_read += read
            root.bytes_written += written

    def count(self, kind: str, n: int = 1) -> None:
        """Record ``n`` requests of ``kind``."""
        root = self._root_counter()
        with root._lock:
            root.requests[kind] += n

    def reset(self) -> None:
        """Zero every counter."""
        root = self._root_counter()
        with root._lock:
            root.bytes_read = root.bytes_written = root.operations = 0
            root.requests.clear()

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.count("write")
        self.inner.write_bytes(key, data)
        self.add(written=memoryview(data).nbytes)

    def open_writer(self, key: str) -> StreamWriter:
        self.count("open")
        return _CountingWriter(self.inner.open_writer(key), self)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self.count("create")
        self.inner.create_exclusive(key, data)
        self.add(written=len(data))

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self.count("read")
        data = self.inner.read_bytes(key, start, end)
        self.add(read=len(data))
        return data

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        self.count("read", len(ranges))
        chunks = self.inner.read_ranges(key, ranges)
        self.add(read=sum(len(c) for c in chunks))
        return chunks

    def exists(self, key: str) -> bool:
        self.count("exists")
        return self.inner.exists(key)

    def is_file(self, key: str) -> bool:
        self.count("exists")
        return self.inner.is_file(key)

    def info(self, key: str) -> ObjectInfo:
        self.count("stat")
        return self.inner.info(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        self.count("list")
        return self.inner.list(prefix)

    def walk(self, prefix: str = "") -> builtins.list[str]:
        self.count("list")
        return self.inner.walk(prefix)

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        self.count("list")
        return self.inner.list_objects(prefix)

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        self.count("delete")
        self.inner.delete(key, missing_ok=missing_ok)

    def delete_many(self, keys: Sequence[str]) -> None:
        self.count("delete_many")
        self.inner.delete_many(keys)

    def delete_prefix(self, prefix: str) -> None:
        self.count("list")  # every backend lists what it deletes
        self.count("delete_many")
        self.inner.delete_prefix(prefix)

    def local_path(self, key: str = "") -> str | None:
        # Reads through a local path would bypass the counters: report none.
        return None


class KnownObjectsStorage(StorageWrapper):
    """A directory whose objects are already known: listings, sizes and existence cost no request.

    For an immutable directory (a committed checkpoint, whose manifest lists
    every file and its size): every rank that loads it can answer "which files,
    how big" from what one rank learnt, and send only reads to the store.
    Writes and deletes go to ``inner`` unchanged, and are not reflected in
    the known objects.
    """

    def __init__(self, inner: Storage, objects: Iterable[ObjectInfo]) -> None:
        super().__init__(inner)
        self.objects = {normalize_key(o.key): o for o in objects}

    def rewrap(self, inner: Storage) -> StorageWrapper:
        raise NotImplementedError("use child(), which keeps the known objects below the key")

    def child(self, key: str) -> Storage:
        prefix = normalize_key(key) + "/"
        below = [dataclasses.replace(o, key=k[len(prefix) :]) for k, o in self.objects.items() if k.startswith(prefix)]
        return KnownObjectsStorage(self.inner.child(key), below)

    def info(self, key: str) -> ObjectInfo:
        found = self.objects.get(normalize_key(key))
        if found is None:
            raise ObjectNotFoundError(errno.ENOENT, f"cannot stat {self.url_of(key)!r}: no such object")
        return found

    def exists(self, key: str) -> bool:
        key = normalize_key(key)
        return key in self.objects or any(k.startswith(key + "/") for k in self.objects) or not key

    def is_file(self, key: str) -> bool:
        return normalize_key(key) in self.objects

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        base = normalize_key(prefix)
        start = base + "/" if base else ""
        below = [dataclasses.replace(o, key=k[len(start) :]) for k, o in self.objects.items() if k.startswith(start)]
        return sorted(below, key=lambda o: o.key)

    def walk(self, prefix: str = "") -> builtins.list[str]:
        return [o.key for o in self.list_objects(prefix)]

    def list(self, prefix: str = "") -> builtins.list[str]:
        return sorted({o.key.split("/", 1)[0] for o in self.list_objects(prefix)})
