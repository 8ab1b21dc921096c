"""State dicts, comparisons and gloo rank workers shared by the DCP tests.

The spawned ranks import this module by name (``run_ranks`` pickles workers
by reference), so it must stay importable from ``tests/dcp`` on ``sys.path``.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch

FULL_SHAPE = (8, 6)
COLUMNS_SHAPE = (4, 6)


def make_state(seed: int) -> dict[str, Any]:
    """A nested state dict of several dtypes and shapes, plus non-tensor values; all differ by seed."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "bias": torch.randn(16, generator=g, dtype=torch.float64),
            "transposed": torch.randn(5, 7, generator=g).t(),  # not contiguous
            "scale": torch.tensor(1.0 + seed),  # 0-dim
        },
        "optim": {
            "step": torch.tensor(seed + 3, dtype=torch.int64),
            "mask": torch.rand(9, generator=g) > 0.5,
            "phase": torch.randn(3, 2, generator=g, dtype=torch.complex64),
            "counts": torch.randint(-1000, 1000, (2, 3, 4), generator=g, dtype=torch.int32),
            "half": torch.randn(6, generator=g).half(),
        },
        "empty": torch.empty(0, 3),
        "blob": b"payload-%d" % seed,  # a bytes item
        "epoch": seed,
        "name": f"run-{seed}",
    }


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of a nested dict."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def same_bits(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two values (tensors: dtype, shape and every byte)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        raw_a = a.detach().contiguous().reshape(-1).view(torch.uint8)
        raw_b = b.detach().contiguous().reshape(-1).view(torch.uint8)
        return bool(torch.equal(raw_a, raw_b))
    return bool(type(a) is type(b) and a == b)


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Leaves of two nested dicts that are not bit-for-bit equal."""
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys(), (sorted(la), sorted(lb))
    return sorted(k for k in la if not same_bits(la[k], lb[k]))


def full_tensors() -> dict[str, torch.Tensor]:
    """The global tensors the rank workers shard (the same on every rank and in the parent)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "rows": torch.randn(*FULL_SHAPE, generator=g),
        "cols": torch.randn(*COLUMNS_SHAPE, generator=g).to(torch.bfloat16),
        "replicated": torch.arange(10, dtype=torch.int64),
    }


def _dtensor_state(mesh: Any, source: dict[str, torch.Tensor], rows: Any, cols: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, distribute_tensor

    return {
        "rows": distribute_tensor(source["rows"], mesh, [rows]),
        "cols": distribute_tensor(source["cols"], mesh, [cols]),
        "replicated": distribute_tensor(source["replicated"], mesh, [Replicate()]),
    }


def _zeros_like(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in source.items()}


def _full(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() for k, v in state.items()}


def _dtensor_scenario(rank: int, url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Save DTensors sharded on dim 0 / dim 1, reload them as saved and resharded the other way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import ckptio.dcp

    mesh = init_device_mesh("cpu", (2,))
    source = full_tensors()
    state = _dtensor_state(mesh, source, Shard(0), Shard(1))
    state_extra = {**state, "rank_local": {"step": 11, "note": b"bytes-item"}}
    for name in ("dtensor", "scratch"):
        dcp.save(state_extra, storage_writer=ckptio.dcp.StorageWriter(f"{url}/{name}", options, files_per_rank=2))
    same = _dtensor_state(mesh, _zeros_like(source), Shard(0), Shard(1))
    same_extra = {**same, "rank_local": {"step": 0, "note": b""}}
    before_same = _full(same)
    dcp.load(same_extra, storage_reader=ckptio.dcp.StorageReader(f"{url}/dtensor", options))
    swapped = _dtensor_state(mesh, _zeros_like(source), Shard(1), Shard(0))
    dcp.load(swapped, storage_reader=ckptio.dcp.StorageReader(f"{url}/dtensor", options))
    return {
        "before_same": before_same,
        "same": _full(same),
        "extra": same_extra["rank_local"],
        "swapped": _full(swapped),
        "local_rows": same["rows"].to_local().clone(),
    }


def _fsdp_model(seed: int) -> tuple[Any, Any]:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 6)).sum().backward()  # one step, so the optimizer has state
    optim.step()
    optim.zero_grad()
    return model, optim


def _full_state(model: Any, optim: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    model_sd, optim_sd = get_state_dict(model, optim)

    def unshard(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: unshard(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [unshard(v) for v in tree]
        return tree.full_tensor() if isinstance(tree, DTensor) else tree

    return {"model": unshard(model_sd), "optim": unshard(optim_sd)}


def _fsdp_scenario(rank: int, url: str, options: dict[str, Any]) -> dict[str, Any]:
    """fully_shard a small model on the CPU, save model and optimizer, load into another one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ckptio.dcp

    model, optim = _fsdp_model(seed=1)
    model_sd, optim_sd = get_state_dict(model, optim)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=ckptio.dcp.StorageWriter(f"{url}/fsdp", options))
    saved = _full_state(model, optim)

    other, other_optim = _fsdp_model(seed=2)
    before = _full_state(other, other_optim)
    model_sd2, optim_sd2 = get_state_dict(other, other_optim)
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, storage_reader=ckptio.dcp.StorageReader(f"{url}/fsdp", options))
    set_state_dict(other, other_optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return {"saved": saved, "before": before, "after": _full_state(other, other_optim)}


def two_rank_worker(rank: int, world_size: int, url: str, options: dict[str, Any]) -> bytes:
    """Run on each of 2 gloo ranks: the DTensor and the fully_shard scenarios, results packed as bytes.

    (Tensors put on a multiprocessing queue travel as shared memory that dies with the rank.)
    """
    warnings.simplefilter("ignore")
    result = {"dtensor": _dtensor_scenario(rank, url, options), "fsdp": _fsdp_scenario(rank, url, options)}
    buffer = io.BytesIO()
    torch.save(result, buffer)
    return buffer.getvalue()


def unpack(packed: bytes) -> Any:
    """A rank's result back from :func:`two_rank_worker`'s bytes."""
    return torch.load(io.BytesIO(packed), weights_only=False)
