"""A component file on local disk is mapped, not read: loading costs no copy of its tensors,
and writing to what was loaded never changes the file (copy-on-write)."""

from __future__ import annotations

import gc
from typing import Any

import psutil
import torch

from ckptio.state.component_io import load_component_state, save_component_state
from ckptio.storage import open_storage

MIB = 2**20


def test_loading_a_local_component_maps_it_and_writes_stay_private(tmp_path: Any) -> None:
    storage = open_storage(str(tmp_path))
    state = {"state": {i: {"exp_avg": torch.full((4 * MIB,), float(i))} for i in range(4)}}  # 64 MiB
    save_component_state(storage, "optimizer.pt", state)
    del state
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    loaded = load_component_state(storage, "optimizer.pt")
    grown = process.memory_info().rss - before
    assert grown < 24 * MIB, f"loading 64 MiB grew RSS by {grown / MIB:.0f} MiB: the file was read, not mapped"

    loaded["state"][2]["exp_avg"].add_(1.0)  # an optimizer step writes in place
    again = load_component_state(storage, "optimizer.pt")
    assert torch.equal(again["state"][2]["exp_avg"], torch.full((4 * MIB,), 2.0))
    assert torch.equal(loaded["state"][2]["exp_avg"], torch.full((4 * MIB,), 3.0))
