"""What each gloo rank runs in the sharded (FSDP2) manager tests (not collected by pytest)."""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

from ckptio import CheckpointConfig, CheckpointManager, SharingPattern, StateComponent


def fsdp_model(world_size: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small MLP, fully_shard-ed over a CPU mesh of every rank (left whole in a world of one)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    if world_size > 1:
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(4, 16)).sum().backward()
    optim.step()
    optim.zero_grad()


def gathered(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    """Full (unsharded) copies of the model's and the optimizer's state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    def full(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: full(v) for k, v in value.items()}
        if isinstance(value, list):
            return [full(v) for v in value]
        if isinstance(value, DTensor):
            return value.full_tensor()
        return value.clone() if isinstance(value, torch.Tensor) else value

    model_state, optim_state = get_state_dict(model, optim)
    return {"model": full(model_state), "optim": full(optim_state)}


class Provider:
    def __init__(self, optim: torch.optim.Optimizer) -> None:
        self.optim = optim

    def get_state_components(self) -> list[StateComponent]:
        return [StateComponent("optimizer", self.optim, SharingPattern.GLOBAL)]

    def get_process_groups(self) -> dict[str, Any]:
        return {}


def _packed(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)  # tensors on a multiprocessing queue would die with the rank
    return buffer.getvalue()


def unpack(packed: bytes) -> Any:
    return torch.load(io.BytesIO(packed), weights_only=False)


def save_sharded(rank: int, world_size: int, url: str, async_save: bool) -> tuple[str, bytes]:
    """Train a step, save, keep training; return the path and the state as it was at the save."""
    warnings.simplefilter("ignore")
    model, optim = fsdp_model(world_size, seed=1)
    train_step(model, optim, seed=rank)
    manager = CheckpointManager(CheckpointConfig(output_dir=url, async_save=async_save), Provider(optim), model=model)
    path = manager.save_checkpoint()
    saved = gathered(model, optim)
    train_step(model, optim, seed=100 + rank)  # changes everything the pending save must not see
    manager.close()
    return path, _packed(saved)


def load_sharded(rank: int, world_size: int, url: str) -> bytes:
    """Build another model (different values), resume the latest checkpoint, return the state."""
    warnings.simplefilter("ignore")
    model, optim = fsdp_model(world_size, seed=2)
    train_step(model, optim, seed=50 + rank)
    manager = CheckpointManager(CheckpointConfig(output_dir=url), Provider(optim), model=model)
    manager.load_checkpoint(None)
    return _packed(gathered(model, optim))
