"""Progress of long transfers: a callback told the bytes moved so far, or a tqdm bar.

Saves, loads, copies and conversions accept ``progress=``: a
:data:`ProgressCallback`, called with a :class:`ProgressEvent` each time more
bytes have moved. ``bytes_done`` never decreases within one operation: an
object written again after a transient failure is counted once, and the
bytes read of an object never count past its known size. The callback may be
called from several threads, one call at a time; keep it quick.

:func:`progress_callback` turns ``True`` into a tqdm bar on stderr (only on
global rank 0, with tqdm installed and stderr a terminal), ``False``/None
into no progress at all, and passes a callback through.
:class:`ProgressStorage` reports the bytes that go through a storage.
"""

from __future__ import annotations

import builtins
import importlib
import os
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ckptio.storage.base import Storage, StreamWriter
from ckptio.storage.wrapper import StorageWrapper

__all__ = [
    "ProgressCallback",
    "ProgressCounter",
    "ProgressEvent",
    "ProgressOperation",
    "ProgressStorage",
    "TqdmProgress",
    "progress_callback",
]

ProgressOperation = Literal["save", "load", "copy", "convert"]


@dataclass(frozen=True)
class ProgressEvent:
    """Bytes moved so far by one operation.

    Attributes:
        operation: ``"save"`` (bytes written), ``"load"`` (bytes read),
            ``"copy"`` or ``"convert"`` (bytes written at the destination).
        url: the directory the operation works on (the checkpoint, or the destination).
        bytes_done: bytes moved so far; never decreases.
        bytes_total: bytes the operation expects to move, None when unknown.
    """

    operation: ProgressOperation
    url: str
    bytes_done: int
    bytes_total: int | None


#: Called with every increase of an operation's progress.
ProgressCallback = Callable[[ProgressEvent], None]


class ProgressCounter:
    """Bytes moved per object, summed into :class:`ProgressEvent` s for one operation; thread-safe.

    Objects are named by URL. Objects in ``ignore`` (bookkeeping such as a
    commit marker) are not counted. Given ``sizes``, only the objects it names
    are counted, each for at most its size.
    """

    def __init__(
        self,
        operation: ProgressOperation,
        url: str,
        callback: ProgressCallback,
        *,
        total: int | None = None,
        sizes: Mapping[str, int] | None = None,
        ignore: Collection[str] = (),
    ) -> None:
        self.operation, self.url, self.callback, self.total = (
            operation,
            url,
            callback,
            total,
        )
        self._sizes = dict(sizes) if sizes is not None else None
        self._ignore = frozenset(ignore)
        self._done: dict[str, int] = {}
        self._sum = 0
        self._lock = threading.Lock()

    @property
    def bytes_done(self) -> int:
        return self._sum

    def _update(self, object_url: str, value: Callable[[int], int]) -> None:
        if object_url in self._ignore or (self._sizes is not None and object_url not in self._sizes):
            return
        with self._lock:
            before = self._done.get(object_url, 0)
            after = value(before)
            if self._sizes is not None:
                after = min(after, self._sizes[object_url])
            if after <= before:
                return
            self._done[object_url] = after
            self._sum += after - before
            self.callback(ProgressEvent(self.operation, self.url, self._sum, self.total))

    def reached(self, object_url: str, nbytes: int) -> None:
        """``object_url`` has ``nbytes`` in the attempt under way (a rewrite from 0 counts nothing new)."""
        self._update(object_url, lambda before: max(before, nbytes))

    def add(self, object_url: str, nbytes: int) -> None:
        """``nbytes`` more of ``object_url`` moved."""
        self._update(object_url, lambda before: before + nbytes)


class _ProgressWriter(StreamWriter):
    """Reports the bytes of one write attempt as they go out."""

    def __init__(self, inner: StreamWriter, counter: ProgressCounter) -> None:
        super().__init__(inner.url)
        self._inner = inner
        self._counter = counter
        self._written = 0

    def _write(self, data: memoryview) -> int:
        n = self._inner.write(data)
        self._written += n
        self._counter.reached(self.url, self._written)
        return n

    def _commit(self) -> None:
        self._inner.commit()

    def _abort(self) -> None:
        self._inner.abort()


class ProgressStorage(StorageWrapper):
    """Reports the bytes written (``writes``) or read (``reads``) through it, and its children, to ``counter``.

    A file handed out by :meth:`local_path` (memory-mapped by the loaders)
    counts as read whole.
    """

    def __init__(
        self,
        inner: Storage,
        counter: ProgressCounter,
        *,
        reads: bool = False,
        writes: bool = False,
    ) -> None:
        super().__init__(inner)
        self.counter = counter
        self.reads, self.writes = reads, writes

    def rewrap(self, inner: Storage) -> ProgressStorage:
        return ProgressStorage(inner, self.counter, reads=self.reads, writes=self.writes)

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.inner.write_bytes(key, data)
        if self.writes:
            self.counter.reached(self.url_of(key), memoryview(data).nbytes)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self.inner.create_exclusive(key, data)
        if self.writes:
            self.counter.reached(self.url_of(key), len(data))

    def open_writer(self, key: str) -> StreamWriter:
        writer = self.inner.open_writer(key)
        return _ProgressWriter(writer, self.counter) if self.writes else writer

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self.inner.read_bytes(key, start, end)
        if self.reads:
            self.counter.add(self.url_of(key), len(data))
        return data

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        chunks = self.inner.read_ranges(key, ranges)
        if self.reads:
            self.counter.add(self.url_of(key), sum(len(c) for c in chunks))
        return chunks

    def local_path(self, key: str = "") -> str | None:
        path = self.inner.local_path(key)
        if self.reads and path is not None and key and os.path.isfile(path):
            self.counter.add(self.url_of(key), os.path.getsize(path))
        return path


class TqdmProgress:
    """A :data:`ProgressCallback` drawing one tqdm bar on stderr (bytes), closed by :meth:`close`."""

    def __init__(self, tqdm: Any, description: str | None = None) -> None:
        self._tqdm = tqdm
        self._description = description
        self._bar: Any = None
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            if self._bar is None or self._bar.n > event.bytes_done:  # a new operation: a new bar
                self._close()
                self._bar = self._tqdm(
                    total=event.bytes_total,
                    desc=self._description or event.operation,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                    dynamic_ncols=True,
                    leave=False,
                )
            if event.bytes_total is not None and self._bar.total != event.bytes_total:
                self._bar.total = event.bytes_total
            self._bar.update(event.bytes_done - self._bar.n)
            if event.bytes_total is not None and event.bytes_done >= event.bytes_total:
                self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Close the bar under way, if any."""
        with self._lock:
            self._close()


def _stderr_is_tty() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


def progress_callback(progress: bool | ProgressCallback | None, *, rank: int = 0) -> ProgressCallback | None:
    """The callback ``progress`` asks for: itself when callable; for True a :class:`TqdmProgress` when
    ``rank`` is 0, tqdm is installed and stderr is a terminal; else None (no progress)."""
    if callable(progress):
        return progress
    if not progress or rank != 0 or not _stderr_is_tty():
        return None
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        return None
    return TqdmProgress(tqdm)
