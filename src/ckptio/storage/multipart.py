"""Streaming uploads with several parts in flight and a bounded memory budget.

s3fs's and gcsfs's own ``open(path, "wb")`` upload one part after another, so
a single object moves at the speed of one connection; a real bucket gives
each connection tens of MB/s and scales with parallel connections. This
module is hand-written because no maintained library streams an object of
unknown size with concurrent parts *and* a memory cap: s3fs's concurrent
``put_file`` needs a local file, and gcsfs has no parallel upload at all.

:class:`ParallelUploadWriter` fills a part buffer from the stream; each full
buffer becomes one part request on the filesystem's event loop, while the
caller goes on filling the next. How parts become an object is the backend's
business (:class:`PartSink`): S3 multipart ``UploadPart``/``CompleteMultipartUpload``,
GCS parallel composite upload.

Guarantees:

* Memory: every part buffer of every writer in the process is drawn from one
  :class:`UploadBudget` (192 MiB by default), so extra memory stays bounded
  whatever the checkpoint size or the number of objects written at once.
  Parts are sent as file bodies (:class:`~ckptio.storage.view_file.ViewFile`), which HTTP clients
  stream instead of copying, so a buffer is the whole cost of a part.
* A part that fails transiently is retried on its own (the buffer is kept
  until it is stored). A writer that cannot complete aborts the upload and
  publishes nothing: never a short object.
* An object never needs more than 10,000 parts: the part size doubles after
  every 1,000 parts (:func:`part_size_for`).
* An object that fits in one part is written with one plain request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import mmap
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ckptio.storage.base import StreamWriter
from ckptio.storage.retry import (
    RetryPolicy,
    is_transient,
    raise_translated,
)

__all__ = [
    "DEFAULT_UPLOAD_BUDGET",
    "MAX_PARTS",
    "ParallelUploadWriter",
    "PartSink",
    "UploadBudget",
    "part_size_for",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Most parts one object may have (S3's limit).
MAX_PARTS = 10_000
#: Parts at one size before the size doubles (10 doublings fit in MAX_PARTS).
_PARTS_PER_SIZE = 1_000


def part_size_for(number: int, base: int, *, ramp: int = 0) -> int:
    """Size of part ``number`` (from 1): ``base``, doubled after every 1,000 parts.

    With ``ramp``, the size also doubles after every ``ramp`` parts, up to four
    times ``base``: a small object still goes out as several parts at once,
    and a big one in fewer parts (GCS composes at most 32 per request). With a
    16 MiB base, 10,000 parts hold about 16 TiB, more than any store accepts
    in one object.
    """
    growth = min((number - 1) // ramp, 2) if ramp else 0
    return int(base << (growth + (number - 1) // _PARTS_PER_SIZE))


class UploadBudget:
    """A cap on the bytes held in part buffers, shared by every writer that draws from it.

    ``acquire`` blocks until the bytes fit. A request larger than the whole
    budget is granted when nothing else is held, so a huge part waits instead
    of deadlocking.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            while self.in_use and self.in_use + nbytes > self.limit:
                self._cond.wait()
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_use -= nbytes
            self._cond.notify_all()


#: The budget every upload draws from unless given another: 192 MiB of part buffers (24 parts
#: of 8 MiB in flight), which leaves room for the HTTP stack within 256 MiB of extra memory.
DEFAULT_UPLOAD_BUDGET = UploadBudget(192 * 2**20)


class PartSink(ABC):
    """The backend side of one object uploaded in parts; every method is a coroutine.

    Parts are numbered from 1 and may arrive in any order; ``complete``
    receives the tokens ``put_part`` returned, in part order. The ``data``
    views are valid only until the call returns: send them as a
    :class:`~ckptio.storage.view_file.ViewFile` (a fresh one per attempt), never keep them.
    """

    #: Parts after which the part size doubles (up to 4x), or 0 for a constant size.
    ramp_parts: int = 0

    @abstractmethod
    async def put_whole(self, data: memoryview) -> None:
        """Publish the object in one request (it fitted in a single part)."""

    @abstractmethod
    async def start(self) -> None:
        """Begin a multipart upload; nothing is visible yet."""

    @abstractmethod
    async def put_part(self, number: int, data: memoryview) -> Any:
        """Store part ``number``; return what ``complete`` needs to reference it."""

    @abstractmethod
    async def complete(self, tokens: list[Any]) -> None:
        """Publish the object from its parts, atomically."""

    @abstractmethod
    async def abort(self) -> None:
        """Discard every stored part; nothing is published."""


async def _with_retries(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """Await ``fn()``, again after transient failures, under ``policy``."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as exc:
            attempt += 1
            if not is_transient(exc) or policy.gives_up(attempt, started):
                raise
            delay = policy.delay(attempt - 1)
            logger.debug("retrying %s in %.2fs after %r", what, delay, exc)
            await asyncio.sleep(delay)


class ParallelUploadWriter(StreamWriter):
    """A :class:`StreamWriter` that keeps up to ``max_in_flight`` parts uploading at once."""

    def __init__(
        self,
        sink: PartSink,
        url: str,
        loop: asyncio.AbstractEventLoop,
        *,
        part_size: int,
        max_in_flight: int,
        retry: RetryPolicy,
        budget: UploadBudget = DEFAULT_UPLOAD_BUDGET,
    ) -> None:
        super().__init__(url)
        self._sink = sink
        self._loop = loop
        self._base_part_size = part_size
        self._max_in_flight = max(1, max_in_flight)
        self._retry = retry
        self._budget = budget
        self._buffer: mmap.mmap | None = None
        self._filled = 0
        self._number = 0  # parts handed to the sink so far
        self._started = False
        self._charge = 0
        self._in_flight: deque[concurrent.futures.Future[Any]] = deque()
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}

    # -- running coroutines on the filesystem's loop -------------------------
    def _run(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``fn()`` on the loop with retries and wait for it."""
        return asyncio.run_coroutine_threadsafe(_with_retries(fn, self._retry, what), self._loop).result()

    # -- buffers -------------------------------------------------------------
    def _new_buffer(self) -> mmap.mmap:
        """A part buffer of anonymous memory: unmapped as soon as the part is stored and
        dropped (the C heap would keep a freed buffer of this size mapped, and grow)."""
        size = part_size_for(self._number + 1, self._base_part_size, ramp=self._sink.ramp_parts)
        self._charge = size
        self._budget.acquire(size)
        self._filled = 0
        return mmap.mmap(-1, size)

    def _drop_buffer(self) -> None:
        if self._buffer is not None:
            self._budget.release(self._charge)
            self._buffer = None
            self._filled = 0

    # -- the stream ------------------------------------------------------------
    def _write(self, data: memoryview) -> int:
        try:
            pos = 0
            while pos < data.nbytes:
                if self._buffer is None:
                    self._buffer = self._new_buffer()
                take = min(len(self._buffer) - self._filled, data.nbytes - pos)
                self._buffer[self._filled : self._filled + take] = data[pos : pos + take]
                self._filled += take
                pos += take
                if self._filled == len(self._buffer):
                    self._send_buffer()
            return data.nbytes
        except Exception as exc:
            self.abort()
            raise_translated(exc, self.url, "write")

    def _send_buffer(self) -> None:
        """Hand the buffer being filled to the sink as the next part; it is released once stored."""
        buffer, charge = self._buffer, self._charge
        if buffer is None:  # pragma: no cover - callers check
            return
        self._buffer = None
        payload = memoryview(buffer)[: self._filled]  # the buffer lives until the part is stored
        self._filled = 0
        if not self._started:
            self._run(self._sink.start, f"start of the upload of {self.url}")
            self._started = True
        while self._in_flight and (self._in_flight[0].done() or len(self._in_flight) >= self._max_in_flight):
            self._in_flight.popleft().result()  # a part that failed for good stops the stream here
        self._number += 1
        number = self._number
        future = asyncio.run_coroutine_threadsafe(
            _with_retries(lambda: self._sink.put_part(number, payload), self._retry, f"part {number} of {self.url}"),
            self._loop,
        )
        future.add_done_callback(lambda _: self._budget.release(charge))
        self._in_flight.append(future)
        self._futures[number] = future

    def _commit(self) -> None:
        try:
            if not self._started:  # it fitted in one part: one plain request
                data = memoryview(self._buffer if self._buffer is not None else b"")[: self._filled]
                self._run(lambda: self._sink.put_whole(data), f"upload of {self.url}")
                self._drop_buffer()
                return
            if self._buffer is not None and self._filled:
                self._send_buffer()
            self._drop_buffer()
            tokens = [self._futures[n].result() for n in range(1, self._number + 1)]
            self._run(lambda: self._sink.complete(tokens), f"completion of the upload of {self.url}")
        except Exception as exc:
            self._discard()
            raise_translated(exc, self.url, "publish")

    def _abort(self) -> None:
        self._discard()

    def _release(self) -> None:
        # Garbage collected unfinished: publish nothing and free the buffer being filled.
        # Parts in flight free theirs when they end; stored parts stay, as a killed process's would.
        self._drop_buffer()

    def _discard(self) -> None:
        """Let the parts in flight end (a part written after an abort would outlive it), then abort."""
        self._drop_buffer()
        concurrent.futures.wait(list(self._futures.values()))
        self._in_flight.clear()
        if not self._started:
            return
        try:
            self._run(self._sink.abort, f"abort of the upload of {self.url}")
        except Exception as exc:  # noqa: BLE001 - nothing is published either way; say what may be billed
            logger.warning(
                "could not abort the upload of %s (%s: %s); nothing was published, but its stored parts "
                "may remain (and be billed) until a bucket lifecycle rule removes them "
                "(S3: AbortIncompleteMultipartUpload; GCS: objects whose names start with .ckptio-tmp-)",
                self.url,
                type(exc).__name__,
                exc,
            )
