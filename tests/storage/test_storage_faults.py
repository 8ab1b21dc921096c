"""Retries of transient faults, and the fault-injecting wrapper itself, on every backend."""

from __future__ import annotations

import errno
import logging

import pytest

from ckptio.errors import (
    ObjectNotFoundError,
    StorageError,
    StoragePermissionError,
    TransientStorageError,
)
from ckptio.storage import (
    FaultInjectingStorage,
    InjectedFault,
    RetryingStorage,
    RetryPolicy,
    SimulatedCrash,
    Storage,
    TransientFault,
    is_transient,
)
from ckptio.storage.retry import call_with_retries, translate_error

FAST = RetryPolicy(max_attempts=30, base_delay=0.0005, max_delay=0.002, deadline=30)


def test_transient_faults_are_retried_to_success(storage: Storage) -> None:
    faulty = FaultInjectingStorage(storage, transient_rate=0.5, seed=7)
    retrying = RetryingStorage(faulty, FAST)
    for i in range(10):
        retrying.write_bytes(f"k{i}", b"payload %d" % i)
    assert [retrying.read_bytes(f"k{i}") for i in range(10)] == [b"payload %d" % i for i in range(10)]
    assert retrying.list() == sorted(f"k{i}" for i in range(10))
    assert faulty.transient_faults > 5


def test_permanent_faults_are_not_retried(storage: Storage) -> None:
    faulty = FaultInjectingStorage(storage, fail_after_ops=0)
    retrying = RetryingStorage(faulty, FAST)
    with pytest.raises(InjectedFault):
        retrying.write_bytes("k", b"v")
    assert faulty.operations == 1
    assert not storage.exists("k")


def test_missing_object_is_not_retried(storage: Storage) -> None:
    faulty = FaultInjectingStorage(storage)
    with pytest.raises(ObjectNotFoundError):
        RetryingStorage(faulty, FAST).read_bytes("absent")
    assert faulty.operations == 1


def test_retries_give_up_with_a_transient_error(storage: Storage) -> None:
    faulty = FaultInjectingStorage(storage, transient_rate=0.999, seed=1)
    with pytest.raises(TransientStorageError, match="after 3 attempts"):
        RetryingStorage(faulty, RetryPolicy(max_attempts=3, base_delay=0.0)).write_bytes("k", b"v")


def test_fail_after_bytes_stops_a_stream_midway(storage: Storage) -> None:
    storage.write_bytes("big.bin", b"old")
    faulty = FaultInjectingStorage(storage, fail_after_bytes=100)
    with pytest.raises(InjectedFault), faulty.open_writer("big.bin") as writer:
        writer.write(b"x" * 60)
        writer.write(b"y" * 60)
    assert storage.read_bytes("big.bin") == b"old"


def test_simulated_crash_skips_cleanup(backend_url, storage: Storage) -> None:
    faulty = FaultInjectingStorage(storage, fail_after_bytes=10, crash=True)
    with pytest.raises(SimulatedCrash), faulty.open_writer("c.bin") as writer:
        writer.write(b"z" * 20)
    with pytest.raises(SimulatedCrash):
        faulty.list()  # a dead process does nothing more
    assert faulty.tripped
    assert not storage.exists("c.bin")  # never committed: invisible, like a killed process


def test_fault_counters_are_shared_with_children(storage: Storage) -> None:
    faulty = FaultInjectingStorage(storage, fail_after_ops=2)
    child = faulty.child("sub")
    child.write_bytes("a", b"1")
    faulty.write_bytes("b", b"2")
    with pytest.raises(InjectedFault):
        child.write_bytes("c", b"3")
    assert faulty.log == ["write a", "write b", "write c"]


# -- classification, without a backend ---------------------------------------------------


class _FakeClientError(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{status} {code}")
        self.response = {"ResponseMetadata": {"HTTPStatusCode": status}, "Error": {"Code": code}}


class _FakeHttpError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"http {code}")
        self.code = code


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        ConnectionResetError(),
        OSError(errno.ETIMEDOUT, "timed out"),
        _FakeClientError(503, "SlowDown"),
        _FakeClientError(500, "InternalError"),
        _FakeHttpError(429),
        _FakeHttpError(502),
        TransientFault("x"),
    ],
)
def test_transient_errors_are_recognised(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(),
        PermissionError(),
        _FakeClientError(403, "AccessDenied"),
        _FakeClientError(404, "NoSuchKey"),
        _FakeHttpError(400),
        ValueError("bad"),
    ],
)
def test_permanent_errors_are_recognised(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_translation_keeps_builtin_types_and_names_the_url() -> None:
    url = "s3://bucket/run/x.bin"
    not_found = translate_error(_FakeClientError(404, "NoSuchKey"), url, "read")
    assert isinstance(not_found, FileNotFoundError) and url in str(not_found)
    denied = translate_error(_FakeClientError(403, "AccessDenied"), url, "read")
    assert isinstance(denied, StoragePermissionError) and isinstance(denied, PermissionError)
    other = translate_error(ValueError("weird"), url, "read")
    assert isinstance(other, StorageError) and url in str(other)


def test_backoff_is_capped_and_exponential() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=4.0)
    sleeps: list[float] = []
    calls = iter([TransientFault("a"), TransientFault("b"), TransientFault("c"), TransientFault("d")])

    def flaky() -> str:
        exc = next(calls, None)
        if exc is not None:
            raise exc
        return "ok"

    assert call_with_retries(flaky, url="u", action="read", policy=policy, sleep=sleeps.append) == "ok"
    caps = [1.0, 2.0, 4.0, 4.0]
    assert len(sleeps) == 4 and all(0 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))


def test_deadline_stops_retrying() -> None:
    policy = RetryPolicy(max_attempts=1000, base_delay=0.0, deadline=0.0)
    attempts = []

    def always_failing() -> None:
        attempts.append(1)
        raise TransientFault("down")

    with pytest.raises(TransientStorageError):
        call_with_retries(always_failing, url="u", action="read", policy=policy)
    assert len(attempts) == 1


def test_a_failed_abort_of_an_upload_is_logged_with_its_url(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import threading

    from ckptio.storage.multipart import ParallelUploadWriter, PartSink

    class _Sink(PartSink):
        async def put_whole(self, data: memoryview) -> None: ...

        async def start(self) -> None: ...

        async def put_part(self, number: int, data: memoryview) -> int:
            return number

        async def complete(self, tokens: list[object]) -> None: ...

        async def abort(self) -> None:
            raise PermissionError("abort refused")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        writer = ParallelUploadWriter(
            _Sink(), "s3://bucket/run/model.safetensors", loop, part_size=4, max_in_flight=2, retry=RetryPolicy()
        )
        writer.write(b"partial upload")
        with caplog.at_level(logging.WARNING, logger="ckptio.storage.multipart"):
            writer.abort()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert "s3://bucket/run/model.safetensors" in caplog.text
    assert "AbortIncompleteMultipartUpload" in caplog.text
