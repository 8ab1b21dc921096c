"""Stall timeouts: a storage request that stops making progress fails instead of hanging.

A server that stops answering (stopped, partitioned, overloaded) leaves a request
waiting forever: TCP keeps the connection open, and an upload whose body fills
the socket buffers waits on a write that no read timeout covers. Two bounds
apply to every request of an object store (storage option ``stall_timeout_s``,
default :data:`DEFAULT_STALL_TIMEOUT_S`):

* the HTTP client's connect and read timeouts (s3fs ``config_kwargs``, gcsfs's
  aiohttp session) are set to the stall timeout;
* ckptio bounds each whole request, the client's own retries included, to
  ``stall_timeout_s`` plus one second per MiB it carries (:func:`request_limit`),
  and cancels it when that runs out.

A request cut off this way raises a :class:`~ckptio.errors.TransientStorageError`
marked as retries exhausted: the server already had the whole stall timeout to
answer, so no layer retries it again (retries would multiply the wait).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable
from typing import Any, TypeVar

from ckptio.errors import InvalidArgumentError, TransientStorageError
from ckptio.storage.multipart import PartSink

__all__ = [
    "DEFAULT_STALL_TIMEOUT_S",
    "STALL_TIMEOUT_OPTION",
    "StallGuardSink",
    "bounded",
    "client_timeouts",
    "pop_stall_timeout",
    "request_limit",
    "stall_error",
]

T = TypeVar("T")

#: Storage option naming the stall timeout in seconds.
STALL_TIMEOUT_OPTION = "stall_timeout_s"
#: How long a request may go without progress when the option is not given.
DEFAULT_STALL_TIMEOUT_S = 120.0
#: The slowest transfer rate a request is granted time for, on top of the stall timeout.
MIN_TRANSFER_RATE = 2**20


def pop_stall_timeout(storage_options: dict[str, Any]) -> float:
    """Remove ``stall_timeout_s`` from ``storage_options`` and return it (or the default)."""
    value = storage_options.pop(STALL_TIMEOUT_OPTION, None)
    if value is None:
        return DEFAULT_STALL_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidArgumentError(f"storage option {STALL_TIMEOUT_OPTION} must be a positive number, got {value!r}")
    return float(value)


def client_timeouts(protocol: str, options: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``options`` with the HTTP client's connect and read timeouts set to ``timeout`` (unless set)."""
    options = dict(options)
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", timeout)
        config.setdefault("read_timeout", timeout)
        # ckptio's RetryPolicy retries every request; botocore's own retries would multiply the
        # wait, and their jitter draws from the global ``random`` that checkpoints save as RNG state.
        config.setdefault("retries", {"total_max_attempts": 1})
        options["config_kwargs"] = config
    elif protocol in ("gs", "gcs"):
        import aiohttp

        session = dict(options.get("session_kwargs") or {})
        session.setdefault("timeout", aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout))
        options["session_kwargs"] = session
    return options


def request_limit(timeout: float, nbytes: int = 0) -> float:
    """How long one request carrying ``nbytes`` may take: ``timeout`` plus 1 s per MiB."""
    return timeout + nbytes / MIN_TRANSFER_RATE


def stall_error(url: str, action: str, limit: float) -> TransientStorageError:
    """The error of a request to ``url`` that got no answer within ``limit`` seconds (never retried)."""
    error = TransientStorageError(
        errno.ETIMEDOUT,
        f"cannot {action} {url!r}: the server did not answer within {limit:.0f} s "
        f"(storage option {STALL_TIMEOUT_OPTION}); the request was cancelled, nothing new was committed "
        "and what was stored before is intact",
    )
    error.retries_exhausted = True
    return error


#: Clean-ups left running after their caller stopped waiting (a reference keeps each task alive).
_LEFT_RUNNING: set[asyncio.Future[Any]] = set()


async def bounded(request: Awaitable[T], *, limit: float, url: str, action: str, cancel: bool = True) -> T:
    """Await ``request``; raise :func:`stall_error` after ``limit`` seconds.

    With ``cancel`` the request is cancelled then. Without (clean-ups: deletes, aborts), it goes on
    in the background and finishes if the server comes back; cancelling a batch delete midway would
    also leave the client's not yet started requests unawaited.
    """
    task = asyncio.ensure_future(request)
    if not cancel:
        _LEFT_RUNNING.add(task)
        task.add_done_callback(_LEFT_RUNNING.discard)
    try:
        return await asyncio.wait_for(task if cancel else asyncio.shield(task), limit)
    except asyncio.TimeoutError as exc:
        raise stall_error(url, action, limit) from exc


class StallGuardSink(PartSink):
    """A :class:`PartSink` whose every request is bounded by :func:`request_limit`."""

    def __init__(self, inner: PartSink, url: str, timeout: float) -> None:
        self._inner = inner
        self._url = url
        self._timeout = timeout
        self.ramp_parts = inner.ramp_parts

    def _bound(self, request: Awaitable[T], action: str, nbytes: int = 0, *, cancel: bool = True) -> Awaitable[T]:
        limit = request_limit(self._timeout, nbytes)
        return bounded(request, limit=limit, url=self._url, action=action, cancel=cancel)

    async def put_whole(self, data: memoryview) -> None:
        await self._bound(self._inner.put_whole(data), "write", data.nbytes)

    async def start(self) -> None:
        await self._bound(self._inner.start(), "start the upload of")

    async def put_part(self, number: int, data: memoryview) -> Any:
        return await self._bound(self._inner.put_part(number, data), f"upload part {number} of", data.nbytes)

    async def complete(self, tokens: list[Any]) -> None:
        await self._bound(self._inner.complete(tokens), "publish")

    async def abort(self) -> None:
        await self._bound(self._inner.abort(), "abort the upload of", cancel=False)
