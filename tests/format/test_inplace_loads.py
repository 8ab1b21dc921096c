"""Remote loads go from the network straight into the module's memory, several ranges at once."""

from __future__ import annotations

import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from ckptio.errors import CorruptCheckpointError, StateDictMismatchError
from ckptio.format import load_checkpoint, ranged_reads, save_checkpoint
from ckptio.format.reader import load_weights
from ckptio.storage import CountingStorage, Storage, StorageWrapper, open_storage

REMOTE = ("s3", "gcs")


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, so values compare bit for bit."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class Net(nn.Module):
    def __init__(self, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, 32, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.randn(width).to(torch.bfloat16))
        self.register_buffer("count", torch.tensor(seed, dtype=torch.int64))


class InFlight(StorageWrapper):
    """Counts ranged reads and the most in flight at once (each one held a little, so overlaps show)."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self.now = self.peak = self.ranged = 0

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        if start is None:
            return self.inner.read_bytes(key, start, end)
        with self._lock:
            self.now += 1
            self.ranged += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(0.02)
            return self.inner.read_bytes(key, start, end)
        finally:
            with self._lock:
                self.now -= 1

    def local_path(self, key: str = "") -> str | None:
        return None  # read local files through read_bytes too, so they are counted


class ShortReads(StorageWrapper):
    """Returns one byte less than asked for from any ranged read past the header length."""

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self.inner.read_bytes(key, start, end)
        return data[:-1] if start is not None and start >= 8 and data else data

    def local_path(self, key: str = "") -> str | None:
        return None


def _open(target: Any) -> Storage:
    return open_storage(target.url, **target.storage_options)


@pytest.fixture
def ranges(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Small ranged reads, so a test-sized tensor is fetched as several."""
    monkeypatch.setattr(ranged_reads, "READ_RANGE_SIZE", 64 * 1024)
    monkeypatch.setattr(ranged_reads, "PARALLEL_READ_THRESHOLD", 256 * 1024)
    yield


def _spy_load_state_dict(module: nn.Module) -> list[str]:
    """Record the names ``module.load_state_dict`` is handed."""
    seen: list[str] = []
    original = module.load_state_dict

    def spy(state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        seen.extend(state_dict)
        return original(state_dict, *args, **kwargs)

    module.load_state_dict = spy  # type: ignore[method-assign]
    return seen


def test_module_is_filled_in_place_bit_exactly(backend_url: Any, ranges: None) -> None:
    saved = Net(seed=1)
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)
    module = Net(seed=2)
    assert not torch.equal(module.body.weight, saved.body.weight)
    pointers = {n: t.data_ptr() for n, t in module.state_dict(keep_vars=True).items()}
    through_load_state_dict = _spy_load_state_dict(module)

    load_checkpoint(_open(backend_url), module)

    for name, tensor in module.state_dict(keep_vars=True).items():
        assert tensor.data_ptr() == pointers[name], name
        assert torch.equal(_raw(tensor), _raw(saved.state_dict()[name])), name
    assert module.head.weight is module.embed.weight  # still tied
    if backend_url.name == "local":
        assert through_load_state_dict != []  # mapped, then copied by load_state_dict, as before
    else:
        assert through_load_state_dict == []  # every tensor was copied once, straight into the module


def test_one_big_tensor_is_fetched_over_several_concurrent_ranges(backend_url: Any, ranges: None) -> None:
    saved = nn.Linear(512, 512)  # a 1 MiB weight: 16 ranges of 64 KiB
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)
    reads = InFlight(_open(backend_url))
    module = nn.Linear(512, 512)
    load_checkpoint(reads, module)
    assert torch.equal(_raw(module.weight), _raw(saved.weight))
    assert reads.ranged >= 16 + 1  # the data ranges plus the header
    if backend_url.name in REMOTE:
        assert reads.peak > 1  # several connections at once
    else:
        assert reads.peak == 1  # local disk and memory gain nothing from overlapping


def test_shards_read_at_once_share_one_budget_of_ranges(backend_url: Any, ranges: None) -> None:
    saved = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(6)])  # 256 KiB each
    save_checkpoint(
        backend_url.url, saved, safetensors=True, max_shard_size=300 * 1024, storage_options=backend_url.storage_options
    )
    reads = InFlight(_open(backend_url))
    module = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(6)])
    load_checkpoint(reads, module)
    assert all(torch.equal(t, saved.state_dict()[n]) for n, t in module.state_dict().items())
    assert reads.ranged >= 6 * 4
    if backend_url.name in REMOTE:
        # Four shards at once, two ranges each (plus a header read of a fifth shard at most).
        assert 1 < reads.peak <= 8 + 1, reads.peak


def test_state_dict_reads_use_several_ranges_too(backend_url: Any, ranges: None) -> None:
    saved = {"big": torch.randn(256, 1024), "small": torch.arange(5)}
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)
    counting = CountingStorage(_open(backend_url))
    loaded = load_checkpoint(counting)
    assert loaded is not None
    assert all(torch.equal(_raw(loaded[n]), _raw(saved[n])) for n in saved)
    assert counting.requests["read"] >= 16  # 1 MiB in 64 KiB ranges (plus index/header reads)


def test_remote_load_holds_only_the_ranges_in_flight(backend_url: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend_url.name == "local":
        pytest.skip("local shards are memory-mapped: no network buffers to measure")
    monkeypatch.setattr(ranged_reads, "READ_RANGE_SIZE", 128 * 1024)
    shard_bytes = 24 * 2**20
    saved = {f"w{i}": torch.randn(2**20) for i in range(6)}  # 6 x 4 MiB in one shard
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)
    module = nn.Module()
    for name in saved:
        module.register_buffer(name, torch.zeros(2**20))
    storage = _open(backend_url)
    tracemalloc.start()
    try:
        load_checkpoint(storage, module)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(torch.equal(getattr(module, n), t) for n, t in saved.items())
    # 8 ranges of 128 KiB in flight, each buffered a few times by the client: far below the shard.
    assert peak < shard_bytes / 3, f"peak {peak / 2**20:.1f} MiB of Python buffers loading a 24 MiB shard"


def test_other_dtype_same_kind_is_cast_through_load_state_dict(backend_url: Any, ranges: None) -> None:
    saved = nn.Linear(256, 256)
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)
    module = nn.Linear(256, 256).to(torch.float16)
    pointer = module.weight.data_ptr()
    through_load_state_dict = _spy_load_state_dict(module)
    load_checkpoint(_open(backend_url), module)
    assert module.weight.data_ptr() == pointer and module.weight.dtype == torch.float16
    assert torch.equal(module.weight, saved.weight.detach().to(torch.float16))
    assert sorted(through_load_state_dict) == ["bias", "weight"]


def _holding(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.register_buffer("weight", weight)
    return module


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.zeros(8, 16), r"'weight': checkpoint shape \[4, 16\], module \[8, 16\]"),
        (torch.zeros(4, 16, dtype=torch.int64), r"'weight': checkpoint dtype torch.float32, module torch.int64"),
    ],
    ids=["shape", "dtype"],
)
def test_mismatches_are_refused_as_before_and_leave_the_module(
    backend_url: Any, weight: torch.Tensor, message: str
) -> None:
    module = _holding(weight)
    save_checkpoint(
        backend_url.url, {"weight": torch.randn(4, 16)}, safetensors=True, storage_options=backend_url.storage_options
    )
    before = {n: t.clone() for n, t in module.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match=message + r".*the module was not modified"):
        load_checkpoint(_open(backend_url), module, strict=False)
    assert all(torch.equal(module.state_dict()[n], t) for n, t in before.items())


def test_strict_and_non_strict_keys_are_unchanged(backend_url: Any, ranges: None) -> None:
    saved = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)
    bigger = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8), nn.Linear(8, 2))
    before = bigger[0].weight.detach().clone()
    with pytest.raises(StateDictMismatchError, match=r"missing '2.weight', '2.bias'.*nothing was loaded"):
        load_weights(_open(backend_url), bigger)
    assert torch.equal(bigger[0].weight, before)  # strict refusal touches nothing

    assert load_weights(_open(backend_url), bigger, strict=False) == {"2.weight", "2.bias"}
    assert torch.equal(bigger[0].weight, saved[0].weight) and torch.equal(bigger[1].bias, saved[1].bias)

    smaller = nn.Sequential(nn.Linear(64, 64))  # an index's other tensors are skipped, even when strict
    assert load_weights(_open(backend_url), smaller) == set()
    assert torch.equal(smaller[0].weight, saved[0].weight)
    with pytest.raises(StateDictMismatchError, match=r"unexpected '1.weight'"):
        load_weights(_open(backend_url), smaller, keys=["0.weight", "1.weight"])


def test_modules_with_load_hooks_or_their_own_loading_still_get_it(backend_url: Any, ranges: None) -> None:
    saved = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    saved[1].running_mean.add_(3)
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)

    hooked = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    seen: list[str] = []
    hooked.register_load_state_dict_pre_hook(lambda _m, state, *_: seen.extend(state))
    load_checkpoint(_open(backend_url), hooked)
    assert "0.weight" in seen and "1.running_mean" in seen  # the hook saw every tensor
    assert torch.equal(hooked.state_dict()["1.running_mean"], saved.state_dict()["1.running_mean"])

    plain = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    through_load_state_dict = _spy_load_state_dict(plain)
    load_checkpoint(_open(backend_url), plain)
    # BatchNorm overrides _load_from_state_dict: its tensors go through it, the Linear's do not.
    via_hooks = sorted(n for n in saved.state_dict() if n.startswith("1.") or backend_url.name == "local")
    assert sorted(through_load_state_dict) == via_hooks
    assert all(torch.equal(plain.state_dict()[n], t) for n, t in saved.state_dict().items())


def test_assign_and_other_devices_keep_the_load_state_dict_path(backend_url: Any, ranges: None) -> None:
    saved = nn.Linear(32, 32)
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)
    module = nn.Linear(32, 32)
    old = module.weight
    load_checkpoint(_open(backend_url), module, assign=True)
    assert module.weight is not old  # assign replaces the parameter, as load_state_dict does
    assert torch.equal(module.weight, saved.weight)


def test_a_short_read_is_reported_as_a_truncated_shard(backend_url: Any, ranges: None) -> None:
    saved = nn.Linear(256, 256)
    save_checkpoint(backend_url.url, saved, safetensors=True, storage_options=backend_url.storage_options)
    storage = ShortReads(_open(backend_url))
    shard = re.escape(storage.url_of("model-00001-of-00001.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=f"{shard}.*expected .*truncated"):
        load_checkpoint(storage, nn.Linear(256, 256))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_big_bin_files_come_over_several_ranges_bit_exactly(backend_url: Any, ranges: None, sharded: bool) -> None:
    saved = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))  # 1 MiB weights
    size = 2**20 + 4096 if sharded else 2**31
    save_checkpoint(
        backend_url.url, saved, safetensors=False, max_shard_size=size, storage_options=backend_url.storage_options
    )
    counting = CountingStorage(_open(backend_url))
    module = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    load_checkpoint(counting, module)
    assert all(torch.equal(_raw(t), _raw(saved.state_dict()[n])) for n, t in module.state_dict().items())
    files = 2 if sharded else 1
    if backend_url.name in REMOTE:
        # 256 KiB in one request, then a stat and 64 KiB ranges for the rest of each ~1 MiB file.
        assert counting.requests["read"] >= files * (1 + 12), counting.requests
        assert counting.requests["stat"] >= files
    else:
        assert counting.requests["read"] == files + 1, counting.requests  # and the index


def test_small_bin_files_stay_one_request(backend_url: Any) -> None:
    saved = nn.Linear(64, 64)
    save_checkpoint(backend_url.url, saved, safetensors=False, storage_options=backend_url.storage_options)
    counting = CountingStorage(_open(backend_url))
    module = nn.Linear(64, 64)
    load_checkpoint(counting, module)
    assert torch.equal(module.weight, saved.weight)
    # The index and the .bin file, one request each; no stat.
    assert counting.requests["read"] == 2 and counting.requests["stat"] == 0, counting.requests


def test_a_short_read_of_a_bin_file_is_reported(backend_url: Any, ranges: None) -> None:
    if backend_url.name not in REMOTE:
        pytest.skip("only object stores read .bin files in ranges")
    save_checkpoint(
        backend_url.url, nn.Linear(512, 512), safetensors=False, storage_options=backend_url.storage_options
    )
    storage = ShortReads(_open(backend_url))
    shard = re.escape(storage.url_of("pytorch_model-00001-of-00001.bin"))
    with pytest.raises(CorruptCheckpointError, match=f"{shard}.*truncated"):
        load_checkpoint(storage, nn.Linear(512, 512))
