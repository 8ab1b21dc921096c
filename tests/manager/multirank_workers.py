"""What each gloo rank runs in the multi-rank manager tests (not collected by pytest)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckptio import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    SharingPattern,
    StateComponent,
    TrainingProgress,
)
from ckptio.checkpoint import find_latest_checkpoint, read_manifest
from ckptio.state import World
from ckptio.storage import open_storage


class Provider:
    """One component per sharing pattern; values tell who wrote them."""

    def __init__(self, group: Any, tag: int) -> None:
        self.group = group
        self.parts = {
            "glob": (TrainingProgress(), SharingPattern.GLOBAL),
            "mine": (TrainingProgress(), SharingPattern.PER_RANK),
            "same": (TrainingProgress(), SharingPattern.REPLICATED),
            "pair": (TrainingProgress(), SharingPattern.PER_GROUP),
            "node": (TrainingProgress(), SharingPattern.PER_NODE),
        }
        self.tag = tag

    def fill(self, rank: int, node: int) -> None:
        for key, (state, _) in self.parts.items():
            state.step = {"glob": 100 + rank, "mine": rank, "same": 7, "pair": 10 + rank, "node": 20 + rank}[key]
            if key != "same":
                state.extra = {"node": node}

    def get_state_components(self) -> list[StateComponent]:
        return [
            StateComponent(key, state, pattern, process_group_name="pairs" if key == "pair" else None,
                           validate_replication=key == "same")
            for key, (state, pattern) in self.parts.items()
        ]

    def get_process_groups(self) -> dict[str, Any]:
        return {"pairs": self.group}

    def values(self) -> dict[str, int]:
        return {key: state.step for key, (state, _) in self.parts.items()}


def _pair_group(rank: int) -> Any:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    return groups[rank // 2]


def save_load_every_pattern(rank: int, world_size: int, output: str) -> dict[str, Any]:
    group = _pair_group(rank)
    world = World.current({"pairs": group})
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    provider = Provider(group, tag=rank)
    provider.fill(rank, world.node_rank)
    manager = CheckpointManager(CheckpointConfig(output_dir=output), provider, model=model)
    path = manager.save_checkpoint()

    fresh = Provider(group, tag=rank)
    torch.manual_seed(1)
    fresh_model = nn.Linear(4, 4)
    CheckpointManager(CheckpointConfig(output_dir=output), fresh, model=fresh_model).load_checkpoint(None)
    result: dict[str, Any] = {"node": world.node_rank, "loaded": fresh.values(),
                              "model_equal": torch.equal(fresh_model.weight, model.weight)}

    provider.parts["same"][0].step = 7 + (rank == 1)  # rank 1 diverges
    try:
        manager.save_checkpoint()
        result["mismatch"] = None
    except CheckpointError as exc:
        result["mismatch"] = str(exc)
        result["mismatch_type"] = type(exc).__name__
        result["mismatch_ranks"] = getattr(exc, "ranks", None)
    dist.barrier()
    result["latest"] = find_latest_checkpoint(output)
    manifest = read_manifest(open_storage(path))
    result["manifest"] = {c.key: (c.ranks, c.files) for c in manifest.components.values()} if manifest else None
    result["world_size"] = manifest.world_size if manifest else None
    return result


def save_twice_to_one_id(rank: int, world_size: int, output: str) -> dict[str, Any]:
    """Every rank saves checkpoint 1 twice: the second save fails on rank 0 (a complete checkpoint is there)."""
    torch.manual_seed(0)
    manager = CheckpointManager(CheckpointConfig(output_dir=output), None, model=nn.Linear(4, 4))
    manager.save_checkpoint(checkpoint_id=1)
    try:
        manager.save_checkpoint(checkpoint_id=1)
    except Exception as exc:  # noqa: BLE001 - the test inspects what every rank raised
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}
