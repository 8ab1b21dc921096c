"""What each rank runs in the multi-rank tests (imported by name in the spawned processes).

``worker`` runs the scenarios of one configuration and returns plain data for
the tests in ``test_state_multirank.py`` to check.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from state_spawn import simulated_nodes_env

from ckptio.state import (
    ReplicationMismatchError,
    SharingPattern,
    World,
    check_replicated,
    file_for_load,
    load_component_state,
    placement_for_save,
    save_component_state,
)
from ckptio.storage import open_storage

__all__ = ["worker"]

P = SharingPattern


def _facts(world: World) -> tuple[Any, ...]:
    return (
        world.rank, world.world_size, world.local_rank, world.local_world_size,
        world.node_rank, world.num_nodes, world.node_ranks,
    )  # fmt: skip


def _world_scenario(world: World) -> dict[str, Any]:
    """World facts and the three collectives; uneven World.current() calls must not desynchronise ranks."""
    if world.rank == 0:
        World.current()  # cached topology: a second call is local and leaves nobody waiting
    world.barrier()
    gathered = world.all_gather_object({"rank": world.rank, "host": socket.gethostname()})
    return {
        "facts": _facts(world),
        "gathered": [g["rank"] for g in gathered],
        "broadcast": world.broadcast_object(f"from-{world.rank}", src=world.world_size - 1),
        "all": world.group_ranks(),
        "distributed": world.is_distributed,
    }


def _placement_scenario(world: World) -> dict[str, Any]:
    placements = {}
    for pattern in P:
        ranks = world.group_ranks("tp") if pattern is P.PER_GROUP else None
        p = placement_for_save(pattern, "c", world, group_name="tp", group_ranks=ranks)
        placements[pattern.value] = (p.file_name, p.writes)
    return {"tp": world.group_ranks("tp"), "placements": placements}


def _optimizer_like_state() -> dict[str, Any]:
    """The nesting of an Adam state dict, built by hand (a real first optimizer step costs seconds per process)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(1.0), "exp_avg": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
                    "exp_avg_sq": torch.rand(2, 3, generator=gen).to(torch.bfloat16)},
            },  # fmt: skip
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
        },
        "w": torch.arange(8.0).to(torch.bfloat16),
    }


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        fn()
    except ReplicationMismatchError as exc:
        return ("mismatch", (exc.key, exc.mismatches, exc.ranks))
    return ("ok", None)


def _replication_scenario(world: World) -> dict[str, Any]:
    same, drifted = _optimizer_like_state(), _optimizer_like_state()
    if world.rank == world.world_size - 1:  # the last rank drifted: one bf16 bit, and nested optimizer state
        drifted["w"].view(torch.int16)[3] ^= 1
        drifted["optimizer"]["state"][0]["exp_avg_sq"][1, 2] += 1
        drifted["optimizer"]["param_groups"][0]["lr"] = 0.2
    return {
        "same": [_outcome(lambda: check_replicated(same, world, key="opt", level=lv)) for lv in ("quick", "full")],
        "drifted": _outcome(lambda: check_replicated(drifted, world, key="opt", level="tensor")),
    }


class _Box:
    """A minimal Stateful holding one tensor."""

    def __init__(self, value: float) -> None:
        self.value = torch.full((2,), float(value))

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"].clone()


def _end_to_end_scenario(world: World, root: str) -> dict[str, Any]:
    storage = open_storage(root)
    # Every rank starts with different content, so a load shows whose file it read.
    boxes = {pattern: _Box(100 * i + world.rank) for i, pattern in enumerate(P)}
    boxes[P.REPLICATED] = _Box(7)
    for pattern, box in boxes.items():
        state = box.state_dict()
        if pattern is P.REPLICATED:
            check_replicated(state, world, key=pattern.value, level="full")
        ranks = world.group_ranks("tp") if pattern is P.PER_GROUP else None
        placement = placement_for_save(pattern, pattern.value, world, group_name="tp", group_ranks=ranks)
        if placement.writes:
            save_component_state(storage, placement.file_name, state)
    world.barrier()
    loaded = {}
    for pattern, box in boxes.items():
        box.load_state_dict({"value": torch.full((2,), -1.0)})
        ranks = world.group_ranks("tp") if pattern is P.PER_GROUP else None
        name = file_for_load(
            pattern, pattern.value, world, saved_world_size=world.world_size, saved_num_nodes=world.num_nodes,
            group_name="tp", group_ranks=ranks,
        )  # fmt: skip
        assert name is not None
        box.load_state_dict(load_component_state(storage, name))
        loaded[pattern.value] = box.value.tolist()
    world.barrier()
    return {"loaded": loaded, "files": sorted(os.listdir(root))}


def _regroup_as_two_nodes(rank: int, world_size: int, port: int) -> None:
    """Restart the process group as torchrun would on 2 nodes of 2 ranks (LOCAL_RANK / LOCAL_WORLD_SIZE)."""
    dist.destroy_process_group()
    os.environ.update(simulated_nodes_env(world_size, 2)[rank])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip


def _run_scenarios(world: World, scenarios: list[str], root: str | None) -> dict[str, Any]:
    run = {
        "world": _world_scenario,
        "placement": _placement_scenario,
        "replication": _replication_scenario,
        "end_to_end": lambda w: _end_to_end_scenario(w, str(root)),
    }
    return {name: run[name](world) for name in scenarios}


def worker(rank: int, world_size: int, root: str | None = None, port: int | None = None) -> dict[str, Any]:
    """Scenarios on one host; with 4 ranks, again after regrouping the same ranks as 2 simulated nodes."""
    first = _run_scenarios(World.current(), ["world", "replication"], root)
    if world_size != 4:
        return {"one_host": first}
    assert port is not None
    _regroup_as_two_nodes(rank, world_size, port)
    # new_group is collective: every rank creates both pairs and keeps its own.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    world = World.current({"tp": pairs[rank // 2]})
    return {"one_host": first, "two_nodes": _run_scenarios(world, ["world", "placement", "end_to_end"], root)}
