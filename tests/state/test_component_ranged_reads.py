"""Big component files (optimizer state) load from object stores over several concurrent ranges."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
import torch

from ckptio.errors import CorruptCheckpointError
from ckptio.format import ranged_reads
from ckptio.state import load_component_state, save_component_state
from ckptio.storage import CountingStorage, KnownObjectsStorage, Storage, StorageWrapper

REMOTE = ("s3", "gcs")


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _adam_state() -> dict[str, Any]:
    """About 1.5 MiB of Adam state (exp_avg and exp_avg_sq of a 256x512 weight, in float32)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 256)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 512)).pow(2).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def _assert_state_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert list(got["state"]) == list(want["state"])
    for index, entry in want["state"].items():
        for name, value in entry.items():
            assert torch.equal(_raw(got["state"][index][name]), _raw(value)), (index, name)


class Concurrency(StorageWrapper):
    """Records the most ranged reads in flight at once (each held a little, so overlaps show)."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self.now = self.peak = 0

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(0.02)
            return self.inner.read_bytes(key, start, end)
        finally:
            with self._lock:
                self.now -= 1


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranged_reads, "READ_RANGE_SIZE", 64 * 1024)
    monkeypatch.setattr(ranged_reads, "PARALLEL_READ_THRESHOLD", 256 * 1024)


def test_a_big_component_file_round_trips_over_concurrent_ranges(storage: Storage, small_ranges: None) -> None:
    state = _adam_state()
    record = save_component_state(storage, "optimizer.pt", state)
    assert record.size > 1024 * 1024
    counting = CountingStorage(Concurrency(storage))
    _assert_state_equal(load_component_state(counting, "optimizer.pt"), state)
    if storage.is_remote:
        # The first 256 KiB in one request, then the size and the rest in 64 KiB ranges, several at once.
        assert counting.requests["read"] == 1 + -(-(record.size - 256 * 1024) // (64 * 1024)), counting.requests
        assert counting.requests["stat"] == 1
        assert counting.inner.peak > 1  # type: ignore[attr-defined]
    elif storage.local_path("optimizer.pt") is None:
        assert counting.requests["read"] == 1 and counting.requests["stat"] == 0, counting.requests


def test_a_small_component_file_is_one_request(storage: Storage) -> None:
    state = {"step": 3, "scale": torch.ones(8)}
    save_component_state(storage, "scheduler.pt", state)
    counting = CountingStorage(storage)
    loaded = load_component_state(counting, "scheduler.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["scale"], state["scale"])
    assert dict(counting.requests) == {"read": 1}  # no stat, no second range


def test_a_component_file_of_exactly_the_threshold_loads(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _adam_state()
    size = save_component_state(storage, "optimizer.pt", state).size
    monkeypatch.setattr(ranged_reads, "PARALLEL_READ_THRESHOLD", size)
    _assert_state_equal(load_component_state(storage, "optimizer.pt"), state)


class ShortRanges(StorageWrapper):
    """Ranged reads past the first byte come back one byte short."""

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self.inner.read_bytes(key, start, end)
        return data[:-1] if start else data


def test_a_short_range_is_a_corrupt_file_naming_it(storage: Storage, small_ranges: None) -> None:
    if not storage.is_remote:
        pytest.skip("only object stores read component files in ranges")
    save_component_state(storage, "optimizer.pt", _adam_state())
    short = ShortRanges(storage)
    url = re.escape(storage.url_of("optimizer.pt"))
    with pytest.raises(CorruptCheckpointError, match=f"{url}.*truncated"):
        load_component_state(short, "optimizer.pt")


def test_sizes_known_from_a_manifest_cost_no_stat(storage: Storage, small_ranges: None) -> None:
    state = _adam_state()
    save_component_state(storage, "optimizer.pt", state)
    counting = CountingStorage(storage)
    known = KnownObjectsStorage(counting, [storage.info("optimizer.pt")])  # as a resume sees it
    _assert_state_equal(load_component_state(known, "optimizer.pt"), state)
    assert counting.requests["stat"] == 0, counting.requests
    if storage.is_remote:
        assert counting.requests["read"] > 1, counting.requests


def test_a_size_from_the_manifest_saves_the_head_request(storage: Storage, small_ranges: None) -> None:
    state = _adam_state()
    size = save_component_state(storage, "optimizer.pt", state).size
    counting = CountingStorage(storage)
    _assert_state_equal(load_component_state(counting, "optimizer.pt", size=size), state)
    if storage.is_remote:
        assert dict(counting.requests) == {"read": -(-size // (64 * 1024))}, counting.requests
