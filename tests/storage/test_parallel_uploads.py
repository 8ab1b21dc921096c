"""Streaming uploads with parts in flight: concurrency, memory budget, part retries, aborts.

The writer is driven against a recording sink (exact and fast), then through the
real S3 and GCS servers, where a part is made to fail once (retried on its own)
or for good (nothing published, the previous object intact, no parts left).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from ckptio.errors import StorageError, TransientStorageError
from ckptio.storage import Storage, open_storage
from ckptio.storage.multipart import (
    MAX_PARTS,
    ParallelUploadWriter,
    PartSink,
    UploadBudget,
    part_size_for,
)
from ckptio.storage.retry import RetryPolicy

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.0, max_delay=0.0)
PART = 5 * 2**20  # S3's smallest part; a multiple of 256 KiB as GCS requires


class RecordingSink(PartSink):
    """Keeps parts in memory; tracks how many are in flight; fails parts on request."""

    def __init__(self, delay: float = 0.01, failures: dict[int, int] | None = None) -> None:
        self.delay = delay
        self.failures = dict(failures or {})  # part number -> failures before it succeeds (-1: always)
        self.parts: dict[int, bytes] = {}
        self.attempts: Counter[int] = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.events: list[str] = []
        self.published: bytes | None = None

    async def put_whole(self, data: memoryview) -> None:
        self.events.append("whole")
        self.published = bytes(data)

    async def start(self) -> None:
        self.events.append("start")

    async def put_part(self, number: int, data: memoryview) -> Any:
        self.attempts[number] += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            left = self.failures.get(number, 0)
            if left:
                self.failures[number] = left - 1 if left > 0 else left
                raise ConnectionResetError(f"part {number} dropped")
            self.parts[number] = bytes(data)
            return ("token", number)
        finally:
            self.in_flight -= 1

    async def complete(self, tokens: list[Any]) -> None:
        assert tokens == [("token", n) for n in range(1, len(tokens) + 1)]
        self.events.append("complete")
        self.published = b"".join(self.parts[n] for n in range(1, len(tokens) + 1))

    async def abort(self) -> None:
        self.events.append("abort")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _writer(sink: PartSink, loop: asyncio.AbstractEventLoop, **kw: Any) -> ParallelUploadWriter:
    options: dict[str, Any] = {"part_size": 1000, "max_in_flight": 4, "retry": FAST_RETRY}
    options.update(kw)
    return ParallelUploadWriter(sink, "s3://bucket/run/obj", loop, **options)


def _stream(writer: ParallelUploadWriter, data: bytes, chunk: int = 777) -> None:
    with writer:
        for start in range(0, len(data), chunk):
            writer.write(data[start : start + chunk])


def test_parts_upload_concurrently_and_publish_in_order(loop: asyncio.AbstractEventLoop) -> None:
    sink = RecordingSink()
    data = os.urandom(20_500)
    _stream(_writer(sink, loop), data)
    assert sink.published == data
    assert len(sink.parts) == 21
    assert sink.peak_in_flight == 4  # a serial writer would never exceed 1
    assert sink.events == ["start", "complete"]


def test_an_object_that_fits_one_part_is_one_request(loop: asyncio.AbstractEventLoop) -> None:
    sink = RecordingSink()
    _stream(_writer(sink, loop), b"x" * 999)
    assert sink.events == ["whole"]
    assert sink.published == b"x" * 999
    empty = RecordingSink()
    _stream(_writer(empty, loop), b"")
    assert empty.events == ["whole"] and empty.published == b""


def test_a_part_that_fails_transiently_is_retried_on_its_own(loop: asyncio.AbstractEventLoop) -> None:
    sink = RecordingSink(failures={3: 2})
    data = os.urandom(8_000)
    _stream(_writer(sink, loop), data)
    assert sink.published == data
    assert sink.attempts[3] == 3
    assert all(sink.attempts[n] == 1 for n in sink.attempts if n != 3)


def test_a_part_that_keeps_failing_aborts_and_publishes_nothing(loop: asyncio.AbstractEventLoop) -> None:
    sink = RecordingSink(failures={2: -1})
    with pytest.raises(TransientStorageError, match="s3://bucket/run/obj"):
        _stream(_writer(sink, loop), os.urandom(8_000))
    assert sink.attempts[2] == FAST_RETRY.max_attempts
    assert "complete" not in sink.events and sink.events[-1] == "abort"
    assert sink.published is None


def test_a_permanent_part_error_is_not_retried(loop: asyncio.AbstractEventLoop) -> None:
    class Refusing(RecordingSink):
        async def put_part(self, number: int, data: memoryview) -> Any:
            self.attempts[number] += 1
            raise PermissionError("AccessDenied")

    sink = Refusing()
    with pytest.raises(StorageError, match="s3://bucket/run/obj"):
        _stream(_writer(sink, loop), os.urandom(3_000))
    assert sum(sink.attempts.values()) <= 4 and max(sink.attempts.values()) == 1
    assert sink.events[-1] == "abort" and sink.published is None


def test_part_buffers_of_all_writers_stay_within_the_budget(loop: asyncio.AbstractEventLoop) -> None:
    budget = UploadBudget(limit=5_000)  # five 1,000-byte parts, shared by four writers
    sinks = [RecordingSink(delay=0.005) for _ in range(4)]
    payloads = [os.urandom(30_000 + i) for i in range(4)]
    threads = [
        threading.Thread(target=_stream, args=(_writer(s, loop, budget=budget, max_in_flight=8), p))
        for s, p in zip(sinks, payloads, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [s.published for s in sinks] == payloads
    assert budget.in_use == 0
    assert 1_000 < budget.peak <= budget.limit


def test_part_size_grows_so_no_object_needs_more_than_max_parts() -> None:
    base = 16 * 2**20
    assert part_size_for(1, base) == part_size_for(1_000, base) == base
    assert part_size_for(1_001, base) == 2 * base
    capacity = sum(part_size_for(n, base) for n in range(1, MAX_PARTS + 1))
    assert capacity > 5 * 2**40  # S3's largest object (5 TiB) fits in 10,000 parts


def test_a_ramp_starts_small_and_stops_at_four_times_the_base() -> None:
    base = 8 * 2**20
    sizes = [part_size_for(n, base, ramp=8) for n in range(1, 40)]
    assert sizes[:8] == [base] * 8 and sizes[8:16] == [2 * base] * 8 and set(sizes[16:]) == {4 * base}
    parts_for_683_mib, total = 0, 0
    while total < 683 * 2**20:
        parts_for_683_mib += 1
        total += part_size_for(parts_for_683_mib, base, ramp=8)
    assert parts_for_683_mib <= 32  # one GCS compose request
    assert part_size_for(1_001, base, ramp=8) == 8 * base


# -- against the real servers ------------------------------------------------------


@pytest.fixture(params=["s3", "gcs"])
def remote(request: pytest.FixtureRequest) -> Iterator[Storage]:
    from tests.conftest import _remove_prefix, _target  # the suite's own server targets

    target = _target(request.param, request, request.getfixturevalue("tmp_path"))
    yield open_storage(target.url, block_size=PART, retry=FAST_RETRY, **target.storage_options)
    _remove_prefix(target)


class _FlakyParts(PartSink):
    """Wraps a real sink; part ``fail_part`` fails ``times`` times first (-1: always)."""

    def __init__(self, inner: PartSink, fail_part: int, times: int) -> None:
        self.inner, self.fail_part, self.left = inner, fail_part, times
        self.attempts: Counter[int] = Counter()

    async def put_whole(self, data: memoryview) -> None:
        await self.inner.put_whole(data)

    async def start(self) -> None:
        await self.inner.start()

    async def put_part(self, number: int, data: memoryview) -> Any:
        self.attempts[number] += 1
        if number == self.fail_part and self.left:
            self.left -= 1 if self.left > 0 else 0
            raise ConnectionResetError("connection reset mid-part")
        return await self.inner.put_part(number, data)

    async def complete(self, tokens: list[Any]) -> None:
        await self.inner.complete(tokens)

    async def abort(self) -> None:
        await self.inner.abort()


def _flaky(storage: Storage, monkeypatch: pytest.MonkeyPatch, fail_part: int, times: int) -> list[_FlakyParts]:
    backend: Any = storage.inner  # type: ignore[attr-defined]
    made: list[_FlakyParts] = []
    real = backend.part_sink

    def part_sink(key: str) -> PartSink:
        made.append(_FlakyParts(real(key), fail_part, times))
        return made[-1]

    monkeypatch.setattr(backend, "part_sink", part_sink)
    return made


def _leftovers(storage: Storage) -> list[str]:
    """Temporary part objects (GCS) or unfinished multipart uploads (S3) below the root."""
    backend: Any = storage.inner  # type: ignore[attr-defined]
    if storage.protocol in ("s3", "s3a"):
        bucket, key, _ = backend.fs.split_path(backend._path(""))
        listed = backend.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        return [u["Key"] for u in listed.get("Uploads", [])]
    return [info.key for info in backend._find("")]


def test_remote_multipart_round_trip_lists_only_the_object(remote: Storage) -> None:
    data = os.urandom(6 * PART + 4321)
    with remote.open_writer("dir/model.safetensors") as writer:
        for start in range(0, len(data), 3 << 20):
            writer.write(data[start : start + (3 << 20)])
    assert remote.read_bytes("dir/model.safetensors") == data
    assert remote.walk("") == ["dir/model.safetensors"]
    assert _leftovers(remote) == ([] if remote.protocol.startswith("s3") else ["dir/model.safetensors"])


def test_remote_part_failing_once_is_retried(remote: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    sinks = _flaky(remote, monkeypatch, fail_part=2, times=1)
    data = os.urandom(3 * PART + 99)
    with remote.open_writer("obj.bin") as writer:
        writer.write(data)
    assert remote.read_bytes("obj.bin") == data
    assert sinks[0].attempts[2] == 2 and sinks[0].attempts[1] == 1


def test_remote_part_failing_for_good_publishes_nothing(remote: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    remote.write_bytes("obj.bin", b"previous")
    _flaky(remote, monkeypatch, fail_part=2, times=-1)
    with pytest.raises(TransientStorageError, match="obj.bin"):
        with remote.open_writer("obj.bin") as writer:
            writer.write(os.urandom(3 * PART + 99))
    assert remote.read_bytes("obj.bin") == b"previous"
    assert remote.walk("") == ["obj.bin"]
    assert _leftovers(remote) == ([] if remote.protocol.startswith("s3") else ["obj.bin"])


def test_an_abandoned_writer_leaves_nothing_listed_and_deleting_the_folder_clears_it(remote: Storage) -> None:
    writer = remote.open_writer("ckpt/model.safetensors")
    writer.write(os.urandom(3 * PART))  # three parts sent, then the writer is dropped: a crash
    upload = getattr(writer, "inner", writer)  # the backend's writer, below the retrying layer's
    for future in list(upload._futures.values()):
        future.result(60)
    del writer, upload
    assert remote.walk("") == [] and remote.list("ckpt") == []
    if not remote.protocol.startswith("s3"):  # GCS parts are hidden objects; S3 parts are invisible
        assert len(_leftovers(remote)) == 3
    remote.delete_prefix("ckpt")
    if not remote.protocol.startswith("s3"):
        assert _leftovers(remote) == []
