"""Reading a few tensors from a bucket fetches only their byte ranges, not the checkpoint."""

from __future__ import annotations

import torch

from ckptio.format import load_checkpoint, save_checkpoint
from ckptio.storage import CountingStorage, open_storage

BIG = 64 * 1024  # float32 elements: 256 KiB per tensor


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {f"block{i}.weight": torch.randn(BIG, generator=gen) for i in range(16)}  # 4 MiB in all
    state["block7.scale"] = torch.tensor([3.0, 4.0])  # small, in the middle of a shard
    return dict(sorted(state.items()))


def test_loading_one_small_tensor_transfers_a_small_fraction(backend_url: object) -> None:
    url, opts = backend_url.url, backend_url.storage_options  # type: ignore[attr-defined]
    state = _state()
    save_checkpoint(url, state, safetensors=True, max_shard_size=2**20, storage_options=opts)
    total = sum(t.numel() * t.element_size() for t in state.values())

    counting = CountingStorage(open_storage(url, **opts))  # reports no local path: reads are counted
    loaded = load_checkpoint(counting, keys={"block7.scale"})
    assert loaded is not None and list(loaded) == ["block7.scale"]
    assert torch.equal(loaded["block7.scale"], state["block7.scale"])
    assert 0 < counting.bytes_read < total / 40, (counting.bytes_read, total)


def test_a_few_tensors_cost_about_their_own_size(backend_url: object) -> None:
    url, opts = backend_url.url, backend_url.storage_options  # type: ignore[attr-defined]
    state = _state()
    save_checkpoint(url, state, safetensors=True, max_shard_size=2**20, storage_options=opts)
    counting = CountingStorage(open_storage(url, **opts))
    keys = ["block2.weight", "block3.weight", "block12.weight"]  # two adjacent, one in another shard
    loaded = load_checkpoint(counting, keys=keys)
    assert loaded is not None and all(torch.equal(loaded[k], state[k]) for k in keys)
    wanted = 3 * BIG * 4
    assert wanted <= counting.bytes_read < wanted + 128 * 1024  # plus index and headers
