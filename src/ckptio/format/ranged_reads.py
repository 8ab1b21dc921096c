"""Fetch an object's bytes with concurrent ranged reads, straight into their destination.

An object store serves one connection at a fraction of the bandwidth it serves
several, so a big read is split into ranges of about :data:`READ_RANGE_SIZE`
bytes, :meth:`~ckptio.storage.Storage.concurrency` of them in flight (one at a
time on local disk and in memory); a smaller object is cut into smaller
ranges (down to :data:`MIN_RANGE_SIZE`) so every connection gets work. Each
range is copied, as it arrives, into the memory it is meant for (a module's
parameter, a fresh tensor, the buffer ``torch.load`` reads) and then dropped:
the extra memory is the ranges in flight, never the object. A range that comes back short is reported as a truncated
object naming its URL, never silently zero-filled.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from ckptio.errors import CorruptCheckpointError, StorageError
from ckptio.storage import Storage
from ckptio.storage.transfer import map_unordered

__all__ = [
    "PARALLEL_READ_THRESHOLD",
    "RANGE_WORKERS",
    "READ_RANGE_SIZE",
    "MIN_RANGE_SIZE",
    "plan_ranges",
    "read_into",
    "read_object",
]

#: Largest ranged request (a bigger tensor is fetched as several).
READ_RANGE_SIZE = 16 * 2**20
#: Smallest range a read is cut into to keep every connection busy (below, request overhead dominates).
MIN_RANGE_SIZE = 8 * 2**20
#: Objects read whole (``.bin`` shards, component files) below this size take one request.
PARALLEL_READ_THRESHOLD = 16 * 2**20
#: Ranged requests of one object kept in flight on backends that overlap requests.
RANGE_WORKERS = 8


def plan_ranges(ranges: Sequence[tuple[int, int]], *, size: int) -> list[tuple[int, int]]:
    """Plan the reads of ``[start, end)`` ranges: at most ``size`` bytes each, in offset order.

    Touching or overlapping ranges are merged into runs, and each run is cut
    into ``size``-byte reads (the last one shorter): many small tensors make
    few requests, and one big tensor is fetched over several connections.
    Empty ranges are dropped.
    """
    if size <= 0:
        raise ValueError(f"range size must be positive, got {size}")
    runs: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    reads: list[tuple[int, int]] = []
    for start, end in runs:
        reads.extend((s, min(s + size, end)) for s in range(start, end, size))
    return reads


def _range_size(total: int, in_flight: int) -> int:
    """The range size for ``total`` bytes on ``in_flight`` connections.

    :data:`READ_RANGE_SIZE`, or less (not under :data:`MIN_RANGE_SIZE`) for
    about two rounds of requests: a 64 MiB object on 8 connections goes as
    8 MiB ranges, not four 16 MiB ones that leave half the connections idle.
    """
    if in_flight <= 1:
        return READ_RANGE_SIZE
    return min(READ_RANGE_SIZE, max(MIN_RANGE_SIZE, -(-total // (2 * in_flight))))


def _short_read(url: str, start: int, end: int, got: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"cannot read {url!r}: bytes [{start}, {end}) returned {got} bytes, expected {end - start}; "
        "the object does not match its size (truncated, or replaced while being read); "
        "the file was not modified"
    )


def read_into(
    storage: Storage,
    key: str,
    placements: Sequence[tuple[int, memoryview]],
    *,
    range_size: int | None = None,
    workers: int = RANGE_WORKERS,
) -> int:
    """Copy bytes of object ``key`` into buffers: ``(offset, buffer)`` receives ``[offset, offset + len)``.

    Buffers must not overlap in the object, and must be writable, contiguous
    byte views (``memoryview`` of format ``B``). Reads are planned with
    :func:`plan_ranges` (``range_size`` bytes each; by default at most
    :data:`READ_RANGE_SIZE`, less when that keeps more connections busy) and
    run with ``storage.concurrency(workers)`` in flight;
    each arriving range is copied into the buffers it covers, so the only extra
    memory is the ranges in flight.

    Returns:
        The number of ranged requests made.

    Raises:
        CorruptCheckpointError: a range came back short (the object is truncated).
        ObjectNotFoundError: the object does not exist.
    """
    ordered = sorted(((offset, view) for offset, view in placements if view.nbytes), key=lambda p: p[0])
    in_flight = storage.concurrency(workers)
    size = range_size or _range_size(sum(view.nbytes for _, view in ordered), in_flight)
    starts = [offset for offset, _ in ordered]
    reads = plan_ranges([(offset, offset + view.nbytes) for offset, view in ordered], size=size)
    url = storage.url_of(key)

    def fetch(span: tuple[int, int]) -> None:
        start, end = span
        try:
            data = memoryview(storage.read_bytes(key, start, end)).cast("B")
        except StorageError as exc:
            if type(exc) is StorageError and _range_refused(exc):
                raise _short_read(url, start, end, 0) from exc  # the range starts past the object's end
            raise
        if data.nbytes != end - start:
            raise _short_read(url, start, end, data.nbytes)
        i = max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(ordered) and ordered[i][0] < end:
            offset, view = ordered[i]
            lo, hi = max(start, offset), min(end, offset + view.nbytes)
            if lo < hi:
                view[lo - offset : hi - offset] = data[lo - start : hi - start]
            i += 1

    for _ in map_unordered(fetch, reads, workers=in_flight, thread_name="ckptio-read"):
        pass
    return len(reads)


def _range_refused(exc: StorageError) -> bool:
    """Whether the store refused a range as unsatisfiable (HTTP 416: it starts past the end)."""
    text = str(exc).lower()
    return "not satisfiable" in text or "invalidrange" in text or "416" in text


def read_object(
    storage: Storage,
    key: str,
    *,
    size: int | None = None,
    threshold: int | None = None,
    range_size: int | None = None,
    workers: int = RANGE_WORKERS,
) -> bytes | bytearray:
    """Read a whole object: one request when it is small, concurrent ranged reads when it is big.

    Only on backends that overlap requests; elsewhere it is one plain read.
    With ``size`` (from a manifest or a listing) an object of at least
    ``threshold`` bytes is fetched in ranges from the start. Without it, the
    first ``threshold`` bytes are asked for in one ranged request: an object
    shorter than that is then complete (one request, as a plain read); a
    bigger one is sized with ``storage.size`` (free when the storage already
    knows its objects) and the rest is fetched with :func:`read_into`.

    Raises:
        CorruptCheckpointError: the object is shorter than its size (truncated).
        ObjectNotFoundError: the object does not exist.
    """
    limit = PARALLEL_READ_THRESHOLD if threshold is None else threshold
    if storage.concurrency(workers) <= 1 or (size is not None and size < limit):
        return storage.read_bytes(key)
    if size is not None:
        buffer = bytearray(size)
        read_into(storage, key, [(0, memoryview(buffer))], range_size=range_size, workers=workers)
        return buffer
    try:
        head = storage.read_bytes(key, 0, limit)
    except StorageError as exc:
        if type(exc) is not StorageError:
            raise  # not found, permission, transient, injected: the plain read would fail alike
        # S3 and GCS refuse any range of an empty object (416); a plain read returns it.
        return storage.read_bytes(key)
    if len(head) < limit:
        return head
    total = storage.size(key)
    if total < len(head):
        raise CorruptCheckpointError(
            f"cannot read {storage.url_of(key)!r}: its size is {total} bytes but {len(head)} were read; "
            "it was replaced while being read; the file was not modified"
        )
    buffer = bytearray(total)
    view = memoryview(buffer)
    view[: len(head)] = head
    del head
    read_into(storage, key, [(limit, view[limit:])], range_size=range_size, workers=workers)
    return buffer
