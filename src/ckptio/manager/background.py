"""One save at a time, written on a background thread; its error is kept for the next call.

:class:`BackgroundSave` runs the write-and-commit half of an asynchronous save
on a single worker thread. At most one save is pending: :meth:`wait` blocks
until it has finished and raises what it raised, once.

Interpreter exit waits for a pending save and logs an error nobody
collected. The hook must run before ``concurrent.futures`` refuses new work
at shutdown: its own hook, registered with ``threading``'s private
``_register_atexit``, sets that flag, and those hooks run last-registered
first, before non-daemon threads are joined and before ``atexit``; a save
still running then would fail at its first upload pool. So the hook is
registered the same way, after ``concurrent.futures`` has registered its own
(``atexit`` is the fallback where that function is missing).

A thread, not a process: the write path spends its time in file writes,
fsync, HTTP requests and CRC32C, which release the GIL (filling an upload
part buffer holds it, a few milliseconds per 8 MiB part), and a process would
have to receive the whole staged state through shared memory first. What
slows training steps during a background save is competition for CPU cores,
measured by ``benchmarks/bench_async.py``; so on Linux the worker runs at a
lower CPU priority (nice +10, inherited by the threads it starts): a trainer
that needs every core keeps them, and the save takes the cores it leaves.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ckptio.errors import CheckpointError, CkptioError

__all__ = ["BackgroundSave"]

logger = logging.getLogger(__name__)

#: How much lower the worker's CPU priority is than the trainer's (Linux nice levels).
NICE_INCREMENT = 10

#: Every runner with a worker thread; waited for at interpreter exit.
_LIVE: weakref.WeakSet[BackgroundSave] = weakref.WeakSet()
_hook_registered = False


def _wait_for_all_at_exit() -> None:
    for runner in list(_LIVE):
        runner._at_exit()


def _register_exit_hook() -> None:
    global _hook_registered
    if _hook_registered:
        return
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        atexit.register(_wait_for_all_at_exit)
    else:
        register(_wait_for_all_at_exit)
    _hook_registered = True


def _lower_priority() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread, inherited by threads it starts)."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere setpriority would lower the whole process
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICE_INCREMENT)
    except OSError as exc:  # not permitted in some sandboxes: keep the trainer's priority
        logger.debug("could not lower the background save's priority: %s", exc)


class BackgroundSave:
    """A single-slot background runner for saves."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._pending_name = ""

    @property
    def pending(self) -> bool:
        """Whether a save was started and not yet waited for."""
        return self._pending is not None

    @property
    def running(self) -> bool:
        """Whether a save was started and has not finished yet."""
        return self._pending is not None and not self._pending.done()

    def start(self, name: str, work: Callable[[], None]) -> None:
        """Run ``work`` (the save of checkpoint ``name``) in the background.

        Raises:
            CheckpointError: a save is still pending (call :meth:`wait` first).
        """
        if self._pending is not None:
            raise CheckpointError(f"cannot start saving {name!r}: the save of {self._pending_name!r} is still pending")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ckptio-async-save", initializer=_lower_priority
            )
            _register_exit_hook()  # after ThreadPoolExecutor's module registered its own: runs before it
            _LIVE.add(self)
        self._pending_name = name
        self._pending = self._executor.submit(work)

    def wait(self) -> None:
        """Block until the pending save (if any) has finished; raise its error, once.

        Raises:
            CkptioError: the error the background save raised (a ckptio error
                as it was raised, anything else as a :class:`CheckpointError`
                naming the checkpoint).
        """
        future, name = self._pending, self._pending_name
        if future is None:
            return
        try:
            future.result()
        except CkptioError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"the asynchronous save of {name!r} failed: {type(exc).__name__}: {exc}; "
                "it was not committed and earlier checkpoints are intact"
            ) from exc
        finally:
            self._pending = None

    def close(self) -> None:
        """Wait for the pending save (raising its error), then stop the worker thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            _LIVE.discard(self)

    def _at_exit(self) -> None:
        try:
            self.close()
        except CkptioError as exc:
            logger.error("asynchronous checkpoint save failed at exit: %s", exc)
