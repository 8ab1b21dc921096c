"""Retrying transient backend failures, and translating backend exceptions.

Object stores fail transiently all the time (timeouts, 5xx, throttling,
connection resets). Those are retried with capped exponential backoff and
full jitter under an overall deadline; permanent failures (403, 404, bad
credentials, bad requests) are raised at once. Every exception leaving the
storage layer is translated here, in one place, into :mod:`ckptio.errors`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from ckptio.errors import (
    BucketNotFoundError,
    CkptioError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
    StoragePermissionError,
    TransientFault,
    TransientStorageError,
)

__all__ = [
    "RetryPolicy",
    "TransientFault",
    "call_with_retries",
    "exhausted_error",
    "is_transient",
    "missing_bucket_error",
    "translate_error",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
}
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
}
_TRANSIENT_TYPE_NAMES = {
    "ServerDisconnectedError",
    "ClientConnectionError",
    "ClientOSError",
    "ClientPayloadError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ResponseStreamingError",
}
_PERMISSION_STATUS = {401, 403}
_PERMISSION_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_EXISTS_STATUS = {409, 412}
#: Jitter has its own generator: retries must not advance the global ``random`` state,
#: which a checkpoint saves and restores as part of the training's RNG state.
_JITTER = random.Random()




@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter and an overall deadline.

    Attempt ``n`` (from 0) sleeps a random time in ``[0, min(max_delay, base_delay * 2**n)]``.
    """

    max_attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0
    deadline: float = 120.0

    def gives_up(self, attempts: int, started: float) -> bool:
        """Whether ``attempts`` failed attempts since ``started`` (``time.monotonic()``) are all
        this policy allows: the attempts or the deadline are spent."""
        return attempts >= self.max_attempts or time.monotonic() - started >= self.deadline

    def delay(self, attempt: int) -> float:
        """The sleep before retry number ``attempt + 1``."""
        cap: float = min(self.max_delay, self.base_delay * (2**attempt))
        return _JITTER.uniform(0.0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and error code of a botocore/gcsfs/aiohttp exception, when it has them."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata", {})
        error = response.get("Error", {})
        status = meta.get("HTTPStatusCode")
        return (int(status) if status else None), error.get("Code")
    for attr in ("code", "status", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value, None
    return None, None


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and its chain of causes/contexts (bounded, cycle-safe)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (timeouts, 5xx, throttling, resets)."""
    for e in _causes(exc):
        if isinstance(e, TransientStorageError) and e.retries_exhausted:
            return False  # another layer already spent its retries: retrying again multiplies them
        if isinstance(e, TransientStorageError | TransientFault):
            return True
        if isinstance(e, CkptioError):
            return False
        if isinstance(e, FileNotFoundError | PermissionError | FileExistsError):
            return False
        if isinstance(e, TimeoutError | asyncio.TimeoutError | ConnectionError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        status, code = _status_and_code(e)
        if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
            return True
        if type(e).__name__ in _TRANSIENT_TYPE_NAMES:
            return True
    return False


def raise_translated(exc: BaseException, url: str, action: str) -> NoReturn:
    """Raise :func:`translate_error`'s error for ``exc``, chained to it; a ckptio error as it is
    (``raise exc from exc`` would make it its own cause, a loop for code that walks causes)."""
    translated = translate_error(exc, url, action)
    if translated is exc:
        raise exc
    raise translated from exc


def translate_error(exc: BaseException, url: str, action: str) -> CkptioError:
    """Map a backend exception to the matching :mod:`ckptio.errors` type, naming ``url``."""
    if isinstance(exc, CkptioError):
        return exc
    message = f"cannot {action} {url!r}: {type(exc).__name__}: {exc}"
    missing_bucket = missing_bucket_error(exc, url, action)
    if missing_bucket is not None:
        return missing_bucket
    status, code = _status_and_code(exc)
    if isinstance(exc, FileNotFoundError) or status == 404 or code in _NOT_FOUND_CODES:
        return ObjectNotFoundError(errno.ENOENT, f"cannot {action} {url!r}: no such object")
    if isinstance(exc, FileExistsError) or status in _EXISTS_STATUS:
        return ObjectExistsError(errno.EEXIST, f"cannot {action} {url!r}: object already exists")
    if isinstance(exc, PermissionError) or status in _PERMISSION_STATUS or code in _PERMISSION_CODES:
        return StoragePermissionError(errno.EACCES, message)
    if is_transient(exc):
        return TransientStorageError(errno.EIO, message)
    err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
    return StorageError(err, message)


#: A GCS JSON API path that 404s only when the bucket is missing (listing objects of ``b/<bucket>``).
_GCS_BUCKET_PATH = re.compile(r"(?:^|/)b/([^/?]+)/o(?:$|\?)")


def missing_bucket_error(exc: BaseException, url: str, action: str) -> BucketNotFoundError | None:
    """A :class:`BucketNotFoundError` naming ``url`` when ``exc`` says the bucket does not exist, else None.

    S3 answers ``NoSuchBucket`` (s3fs turns it into a ``FileNotFoundError``
    caused by it); GCS answers 404 to a listing of a missing bucket.
    """
    for e in _causes(exc):
        if isinstance(e, BucketNotFoundError):
            return e
        _, code = _status_and_code(e)
        text = str(e)
        gcs = _GCS_BUCKET_PATH.search(text) if isinstance(e, FileNotFoundError) else None
        if code == "NoSuchBucket" or "specified bucket does not exist" in text or gcs is not None:
            bucket = url.partition("://")[2].split("/", 1)[0] if "://" in url else (gcs.group(1) if gcs else "")
            return BucketNotFoundError(
                errno.ENOENT,
                f"cannot {action} {url!r}: bucket {bucket!r} does not exist; create it or fix the URL "
                "(nothing was written)",
            )
    return None


def call_with_retries(
    fn: Callable[[], T],
    *,
    url: str,
    action: str,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Call ``fn``, retrying transient failures under ``policy``; translate what escapes.

    Each retry is logged at DEBUG and reported to ``on_retry`` (a counter).

    Raises:
        TransientStorageError: a transient fault outlasted the attempts or the deadline.
        StorageError: any permanent failure, translated (``ObjectNotFoundError``, ...).
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every backend error is translated here
            transient = is_transient(exc)
            attempt += 1
            if not transient or policy.gives_up(attempt, started):
                if transient and policy.max_attempts > 1:
                    raise exhausted_error(
                        f"cannot {action} {url!r}: still failing after {attempt} attempts "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
                raise_translated(exc, url, action)
            delay = policy.delay(attempt - 1)
            logger.debug("retrying %s %s in %.2fs after %r", action, url, delay, exc)
            if on_retry is not None:
                on_retry()
            sleep(delay)


def exhausted_error(message: str) -> TransientStorageError:
    """A :class:`TransientStorageError` whose retries are spent: no outer layer retries it again."""
    error = TransientStorageError(errno.EIO, message)
    error.retries_exhausted = True
    return error
