"""What each gloo rank runs in the sharded export tests (not collected by pytest)."""

from __future__ import annotations

import io
import json
import warnings

import torch
from sharded_workers import Provider
from torch import nn

from ckptio import CheckpointConfig, CheckpointManager
from ckptio.manager.export import save_sharded_model
from ckptio.state import World
from ckptio.storage import FaultInjectingStorage, open_storage


class TinyConfig:
    """What ``save_model`` looks for on a Hugging Face model: a config with ``to_json_string``."""

    def to_json_string(self) -> str:
        return json.dumps({"model_type": "tiny", "hidden": 33})


def sharded_model(world_size: int) -> nn.Module:
    """An MLP fully_shard-ed over every rank: uneven shards along dim 0, and one weight split along dim 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 10), nn.ReLU(), nn.Linear(10, 8))
    model.register_buffer("scale", torch.arange(5, dtype=torch.float32))

    def placement(param: nn.Parameter) -> Shard:
        return Shard(1) if tuple(param.shape) == (8, 10) else Shard(0)  # FSDP needs dim 1 even

    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)), shard_placement_fn=placement)
    return model


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()
    }


def save_then_save_model(rank: int, world_size: int, url: str, model_dir: str) -> tuple[str, bytes, list[str]]:
    """Train a step, save a checkpoint, write the model with ``save_sharded_model``, then twice more:
    over it without ``overwrite``, and into a storage whose writes fail part way through (only rank 0
    writes; every rank must raise, none may be left waiting in a gather). Return the checkpoint path,
    the full model state, and the errors."""
    warnings.simplefilter("ignore")
    model = sharded_model(world_size)
    model.config = TinyConfig()  # type: ignore[assignment]
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.manual_seed(rank)
    model(torch.randn(4, 16)).sum().backward()
    optim.step()
    optim.zero_grad()
    manager = CheckpointManager(CheckpointConfig(output_dir=url), Provider(optim), model=model)
    path = manager.save_checkpoint()
    manager.close()
    state = _full_state(model)
    world = World.current()
    save_sharded_model(open_storage(model_dir), model, world, max_shard_size=700)
    errors = []
    failing = FaultInjectingStorage(open_storage(f"{model_dir}-failing"), fail_after_bytes=1500)
    for target in (open_storage(model_dir), failing):
        try:
            save_sharded_model(target, model, world, max_shard_size=700)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(type(exc).__name__)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return path, buffer.getvalue(), errors
