"""The sharded state and the save/load cases of ``bench_sharded.py`` (run on every gloo rank).

The state is ``_bench_state``'s transformer, ``fully_shard``-ed (FSDP2) over a
CPU mesh of every rank, built on the meta device and materialised shard by
shard (no rank ever holds the whole model), plus AdamW after one real step:
per rank, a third of its bytes are weights and two thirds ``exp_avg`` /
``exp_avg_sq``, all DTensors sharded on dim 0, and a ``step`` scalar per
parameter. Each rank fills its own shards from a generator seeded by its
rank. The first world of a size builds the state (the step takes seconds) and
keeps each rank's bytes in a file; later worlds read them back, so every case
and target of a run saves the same bytes at that size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from _bench_state import Transformer, shape_for
from torch import nn

#: case name -> what it is (the report's legend)
CASES = {
    "ckptio": "ckptio.dcp.StorageWriter / StorageReader, defaults",
    "dcp": "torch DCP FileSystemWriter/Reader on local disk, FsspecWriter/Reader on buckets, defaults",
}


def _sharded_model(size_mib: int, world_size: int) -> nn.Module:
    """The transformer, ``fully_shard``-ed per block and at the root, with uninitialised local shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = Transformer(shape_for(size_mib))
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    return model


def build_sharded_state(
    size_mib: int, world_size: int, seed: int = 0
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The FSDP2 model and its AdamW after one step; about ``size_mib`` MiB over all ranks together."""
    import torch.distributed as dist

    model = _sharded_model(size_mib, world_size)
    gen = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    params = list(model.parameters())
    with torch.no_grad():
        for param in params:  # this rank's shard only
            param.to_local().uniform_(-0.05, 0.05, generator=gen)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    for (
        param
    ) in params:  # the gradient is the parameter: no backward pass, no extra memory
        param.grad = param.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def sharded_state(
    size_mib: int, world_size: int, state_dir: str
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """:func:`build_sharded_state`, built once per size and world: later calls read this rank's bytes back."""
    import torch.distributed as dist

    path = os.path.join(
        state_dir, f"sharded-{size_mib}MiB-rank{dist.get_rank()}of{world_size}.raw"
    )
    if not os.path.exists(path):
        model, optimizer = build_sharded_state(size_mib, world_size)
        with open(f"{path}.tmp", "wb") as out:
            for view in _byte_views(dcp_state(model, optimizer)):
                out.write(view)
        os.replace(f"{path}.tmp", path)
        return model, optimizer
    model = _sharded_model(size_mib, world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for param in (
        model.parameters()
    ):  # what AdamW's first step creates, filled from the file below
        moments = {
            k: torch.empty_like(param.detach()) for k in ("exp_avg", "exp_avg_sq")
        }
        optimizer.state[param] = {"step": torch.tensor(0.0), **moments}
    with open(path, "rb") as src:
        for view in _byte_views(dcp_state(model, optimizer)):
            if src.readinto(view) != view.nbytes:
                raise EOFError(
                    f"{path} is shorter than this rank's {size_mib} MiB state"
                )
    return model, optimizer


def _byte_views(state: dict[str, Any]) -> list[memoryview]:
    """The memory of this rank's tensors, without copying (so reading into a view fills the tensor)."""
    tensors = local_tensors(state)
    if not all(t.is_contiguous() for t in tensors):
        raise AssertionError(
            "a local shard is not contiguous: its bytes cannot be viewed in place"
        )
    return [
        memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()) for t in tensors
    ]


def dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """DCP's state dict of the model and optimizer: DTensors sharing the live shards' memory."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def local_tensors(state: Any) -> list[torch.Tensor]:
    """This rank's tensors of ``state`` (the local shard of each DTensor), in a fixed order."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in local_tensors(state[key])]
    if isinstance(state, list | tuple):
        return [t for value in state for t in local_tensors(value)]
    if isinstance(state, DTensor):
        return [state.to_local()]
    return [state] if isinstance(state, torch.Tensor) else []


def local_bytes(state: dict[str, Any]) -> int:
    """Bytes of this rank's tensors."""
    return sum(t.numel() * t.element_size() for t in local_tensors(state))


def digest(state: dict[str, Any]) -> str:
    """CRC32C of this rank's tensors, one after another (checks that a load restored every byte)."""
    from ckptio.storage.integrity import Crc32c

    crc = Crc32c()
    for view in _byte_views(state):
        crc.update(view)
    return crc.hexdigest()


def zero(state: dict[str, Any]) -> None:
    """Overwrite this rank's tensors with zeros, so a load must bring every byte back."""
    with torch.no_grad():
        for tensor in local_tensors(state):
            tensor.zero_()


def _storage(case: str, target: str, options: dict[str, Any], write: bool) -> Any:
    """The case's DCP StorageWriter (``write``) or StorageReader on ``target``."""
    if case == "ckptio":
        import ckptio.dcp

        kind = ckptio.dcp.StorageWriter if write else ckptio.dcp.StorageReader
        return kind(target, storage_options=options or None)
    from _bench_ops import _dcp_io

    return _dcp_io(target, options, write)


def dcp_op(
    case: str, op: str, state: dict[str, Any], options: dict[str, Any], group: Any
) -> Callable[[str], None]:
    """``run(target)``: ``dcp.save`` of ``state`` (``op`` "save") or ``dcp.load`` into it, in place
    (``op`` "load"), through the case's storage, with ``group`` for DCP's collectives."""
    import torch.distributed.checkpoint as dcp

    def run(target: str) -> None:
        storage = _storage(case, target, options, op == "save")
        if op == "save":
            dcp.save(state, storage_writer=storage, process_group=group)
        else:
            dcp.load(state, storage_reader=storage, process_group=group)

    return run


def sync_disk(target: str) -> None:
    """Flush dirty pages before a local operation, so one run's writeback is not the next one's."""
    if "://" not in target:
        os.sync()
