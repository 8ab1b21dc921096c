"""The ranged-read planner and the scatter of arriving ranges into their buffers."""

from __future__ import annotations

import io
import os

import pytest
import torch

from ckptio.errors import CorruptCheckpointError
from ckptio.format import ranged_reads
from ckptio.format.ranged_reads import plan_ranges, read_into, read_object
from ckptio.storage import CountingStorage, Storage
from ckptio.storage.view_file import ViewFile


def test_touching_ranges_merge_up_to_the_size_and_big_ones_split() -> None:
    assert plan_ranges([(10, 20), (0, 10), (30, 40), (5, 5)], size=100) == [(0, 20), (30, 40)]
    assert plan_ranges([(0, 25)], size=10) == [(0, 10), (10, 20), (20, 25)]
    assert plan_ranges([(0, 4), (4, 8), (8, 30), (40, 41)], size=10) == [(0, 10), (10, 20), (20, 30), (40, 41)]
    assert plan_ranges([], size=10) == []
    with pytest.raises(ValueError, match="positive"):
        plan_ranges([(0, 1)], size=0)


def test_arriving_ranges_land_in_their_buffers_exactly(storage: Storage) -> None:
    data = os.urandom(5000)
    storage.write_bytes("blob", data)
    layout = [(3, 1), (4, 700), (704, 13), (900, 2000), (2900, 0), (2950, 2050)]  # gaps, touching, empty
    buffers = [bytearray(n) for _, n in layout]
    counting = CountingStorage(storage)
    made = read_into(counting, "blob", [(o, memoryview(b)) for (o, _), b in zip(layout, buffers)], range_size=97)
    for (offset, n), buffer in zip(layout, buffers):
        assert bytes(buffer) == data[offset : offset + n], (offset, n)
    assert made == counting.requests["read"] == sum(-(-n // 97) for n in (714, 2000, 2050))


def test_tensors_are_filled_through_their_own_memory(storage: Storage) -> None:
    source = torch.arange(4096, dtype=torch.float32)
    storage.write_bytes("t", source.numpy().tobytes())
    target = torch.zeros(4096)
    pointer = target.data_ptr()
    read_into(storage, "t", [(0, target.numpy().data.cast("B"))], range_size=1000)
    assert target.data_ptr() == pointer and torch.equal(target, source)


def test_a_small_object_is_one_request_a_big_one_several(storage: Storage) -> None:
    storage.write_bytes("small", b"x" * 100)
    storage.write_bytes("big", bytes(range(256)) * 40)
    counting = CountingStorage(storage)
    assert read_object(counting, "small", threshold=1000, range_size=300) == b"x" * 100
    assert dict(counting.requests) == {"read": 1}
    counting.reset()
    assert bytes(read_object(counting, "big", threshold=1000, range_size=300)) == bytes(range(256)) * 40
    if storage.is_remote:
        assert counting.requests["read"] == 1 + 31 and counting.requests["stat"] == 1  # 9240 bytes in 300s
    else:
        assert dict(counting.requests) == {"read": 1}


def test_an_empty_object_reads_as_empty(storage: Storage) -> None:
    storage.write_bytes("empty", b"")
    assert bytes(read_object(storage, "empty", threshold=1000)) == b""


def test_view_file_reads_and_seeks_without_copying_the_buffer() -> None:
    data = bytearray(b"0123456789")
    with ViewFile(data) as file:
        assert file.read(3) == b"012"
        assert file.seek(-2, io.SEEK_END) == 8 and file.read() == b"89"
        assert file.seek(1) == 1 and file.tell() == 1 and file.read(100) == b"123456789"
        assert file.read(1) == b""
        with pytest.raises(ValueError, match="negative"):
            file.seek(-1)
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6)}, buffer)
    assert torch.equal(torch.load(ViewFile(buffer.getvalue()), weights_only=True)["w"], torch.arange(6))


def test_a_known_size_fetches_every_range_at_once_without_a_stat(storage: Storage) -> None:
    data = os.urandom(9000)
    storage.write_bytes("big", data)
    counting = CountingStorage(storage)
    assert bytes(read_object(counting, "big", size=9000, threshold=1000, range_size=300)) == data
    if storage.is_remote:
        assert dict(counting.requests) == {"read": 30}  # 9000 bytes in 300s, no head read, no stat
    else:
        assert dict(counting.requests) == {"read": 1}
    counting.reset()
    assert read_object(counting, "big", size=9000, threshold=10_000) == data
    assert dict(counting.requests) == {"read": 1}  # below the threshold: one plain read


def test_an_object_shorter_than_its_known_size_is_truncated(storage: Storage) -> None:
    if not storage.is_remote:
        pytest.skip("one plain read: nothing to compare the size with")
    storage.write_bytes("cut", b"y" * 2500)
    with pytest.raises(CorruptCheckpointError, match=r"'[^']*/cut'.*expected 300.*truncated"):
        read_object(storage, "cut", size=3000, threshold=1000, range_size=300)


def test_smaller_objects_are_cut_finer_so_every_connection_has_work(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranged_reads, "READ_RANGE_SIZE", 4000)
    monkeypatch.setattr(ranged_reads, "MIN_RANGE_SIZE", 1000)
    data = os.urandom(9000)
    storage.write_bytes("blob", data)
    buffer = bytearray(9000)
    made = read_into(storage, "blob", [(0, memoryview(buffer))])
    assert bytes(buffer) == data
    # Eight connections: ranges of 1000 bytes (the floor), not three of 4000; one connection: 4000.
    assert made == (9 if storage.is_remote else 3)
