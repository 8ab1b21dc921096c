"""Requests in flight: the one place ckptio runs storage operations concurrently.

Object-store requests are round trips: overlapping them is what makes a
remote save or load fast. Local disk gains nothing from it (and a thread per
file only adds contention), so :meth:`~ckptio.storage.Storage.concurrency`
decides, per backend, how many requests to keep in flight; these helpers run
a function over items with at most that many at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

__all__ = ["map_concurrently", "map_unordered", "rate_summary", "run_alongside", "run_both"]

T = TypeVar("T")
R = TypeVar("R")
A = TypeVar("A")
B = TypeVar("B")


def map_concurrently(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int, thread_name: str = "ckptio"
) -> list[R]:
    """``[fn(x) for x in items]`` with at most ``workers`` calls in flight, results in input order.

    The first exception raised by a call is raised here, after the calls already
    started have finished.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix=thread_name) as pool:
        return list(pool.map(fn, items))


def map_unordered(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int, thread_name: str = "ckptio"
) -> Iterator[R]:
    """Yield ``fn(x)`` for each item in completion order, at most ``workers`` in flight.

    Items are submitted lazily, so a consumer that stops early (or raises)
    leaves the remaining items unstarted; those not yet running are cancelled.
    """
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    pending: set[Future[R]] = set()
    queue = list(items)
    queue.reverse()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name) as pool:
        try:
            while queue or pending:
                while queue and len(pending) < workers:
                    pending.add(pool.submit(fn, queue.pop()))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


_side_pool: ThreadPoolExecutor | None = None
_side_pool_lock = threading.Lock()


def run_alongside(side: Callable[[], object], main: Callable[[], R]) -> R:
    """Run ``side`` on a helper thread while ``main`` runs here; return ``main``'s result.

    For work that releases the GIL (checksums) next to I/O on the same bytes.
    Both have finished when this returns; an exception of either is raised.
    """
    global _side_pool
    with _side_pool_lock:
        if _side_pool is None:
            _side_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckptio-side")
    future = _side_pool.submit(side)
    try:
        result = main()
    finally:
        wait([future])
    future.result()
    return result


def run_both(background: Callable[[], A], foreground: Callable[[], B], *, concurrently: bool) -> tuple[A, B]:
    """``(background(), foreground())``: with ``concurrently``, ``background`` runs on a thread of
    its own while ``foreground`` runs here; without, ``foreground`` runs first, then ``background``.

    Either way ``foreground`` (whatever must stay on the calling thread, such as collectives)
    never waits on ``background``, so a failure there cannot keep it from other ranks. Both have
    finished when this returns; ``foreground``'s exception wins.
    """
    if not concurrently:
        result = foreground()
        return background(), result
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptio-both") as pool:
        future = pool.submit(background)
        try:
            result = foreground()
        finally:
            wait([future])
        return future.result(), result


def rate_summary(nbytes: int, seconds: float) -> str:
    """``"1.07 GB in 2.41 s (0.44 GB/s)"``: what a log line says about a transfer."""
    rate = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    return f"{nbytes / 1e9:.3g} GB in {seconds:.2f} s ({rate:.3g} GB/s)"
