"""What each gloo rank runs in the multi-rank asynchronous save tests (not collected by pytest).

Every rank trains a small model wrapped in DistributedDataParallel (its
backward all-reduces gradients on the default group) and issues a collective
of its own each step, so the training loop keeps talking on the default group
while a background save exchanges records on its own group.
"""

from __future__ import annotations

import copy
import io
import threading
from typing import Any

import torch
import torch.distributed as dist
from manager_helpers import same_state
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ckptio import (
    CheckpointConfig,
    CheckpointManager,
    CkptioError,
    RNGState,
    SharingPattern,
    StateComponent,
    TrainingProgress,
)
from ckptio.checkpoint import find_latest_checkpoint, list_checkpoints
from ckptio.state import World
from ckptio.storage import (
    FaultInjectingStorage,
    RetryPolicy,
    Storage,
    StorageWrapper,
    StreamWriter,
    open_storage,
)

#: Small enough that the model below makes several shards, so every rank writes a share.
SHARD_SIZE = 2048
NO_RETRY = RetryPolicy(max_attempts=1)
#: How long a gated write waits for the training loop before giving up (a hang fails, it never blocks).
GATE_TIMEOUT = 120.0


class Net(nn.Module):
    """Float weights of several sizes, a tied pair, an int64 and a float64 buffer updated in place."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight  # tied: stored once
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale", torch.ones(4, dtype=torch.float64))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.seen += tokens.numel()
            self.scale.mul_(1.001)
        return self.head(self.body(self.embed(tokens)))


class RankNoise:
    """PER_RANK: a tensor of its own on every rank, changed in place each step."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.value = torch.full((64,), float(rank), dtype=torch.float64)
        self.history: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "rank": self.rank, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["rank"] == self.rank, (state["rank"], self.rank)
        self.value.copy_(state["value"])
        self.history[:] = state["history"]


class NodeTable:
    """PER_NODE: identical on the ranks of a node, different between nodes."""

    def __init__(self, node: int) -> None:
        self.node = node
        self.table = torch.full((4, 8), float(node * 1000), dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table, "node": self.node}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["node"] == self.node, (state["node"], self.node)
        self.table.copy_(state["table"])


class Trainer:
    """A DDP replica, its optimizer (replicated), scheduler and progress (global), RNG and noise (per rank),
    and a per-node table; ``step()`` trains one step and issues the loop's own collective."""

    def __init__(self, rank: int, world_size: int, seed: int = 0) -> None:
        self.rank, self.world_size = rank, world_size
        self.node = World.current().node_rank
        self.ddp = DistributedDataParallel(Net(seed))  # rank 0's weights on every rank, as DDP has it
        self.model: Net = self.ddp.module
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.progress = TrainingProgress()
        self.rng = RNGState()
        self.noise = RankNoise(rank)
        self.table = NodeTable(self.node)
        torch.manual_seed(1000 + rank + 17 * seed)  # each rank draws its own data
        self.collectives = 0

    def get_state_components(self) -> list[StateComponent]:
        return [
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED, validate_replication=True),
            StateComponent("scheduler", self.scheduler, SharingPattern.GLOBAL),
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
            StateComponent("noise", self.noise, SharingPattern.PER_RANK),
            StateComponent("table", self.table, SharingPattern.PER_NODE),
        ]

    def get_process_groups(self) -> dict[str, Any]:
        return {}

    def step(self) -> None:
        tokens = torch.randint(0, 32, (8, 4))
        loss = self.ddp(tokens).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()  # DDP: all-reduce of the gradients on the default group
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        with torch.no_grad():
            self.noise.value.add_(torch.randn(64, dtype=torch.float64))
            self.table.table.add_(1.0)
        self.noise.history.append(self.progress.step)
        # The loop's own collective on the default group (a metric all-reduce).
        check = torch.tensor([float(self.rank + 1), float(self.progress.step)])
        dist.all_reduce(check)
        expected = [self.world_size * (self.world_size + 1) / 2, float(self.progress.step * self.world_size)]
        assert check.tolist() == expected, (check.tolist(), expected)
        self.collectives += 1

    def snapshot(self) -> dict[str, Any]:
        """Everything a load must bring back, as private copies."""
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "progress": copy.deepcopy(self.progress.state_dict()),
            "rng": copy.deepcopy(self.rng.state_dict()),
            "noise": copy.deepcopy(self.noise.state_dict()),
            "table": copy.deepcopy(self.table.state_dict()),
            "tied": self.model.head.weight is self.model.embed.weight,
        }


def to_bytes(obj: Any) -> bytes:
    """``obj`` as torch.save bytes: tensors would cross the result queue as shared memory that dies with
    the rank's process."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


class Gate:
    """Holds every write of a rank's background save until the training loop opens it."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.held = 0  # writes that found the gate closed
        self._lock = threading.Lock()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def pass_through(self) -> None:
        if self._open.is_set():
            return
        with self._lock:
            self.held += 1
        if not self._open.wait(GATE_TIMEOUT):
            raise TimeoutError("the training loop never opened the gate")


class GatedStorage(StorageWrapper):
    """Every write (marker, shards, components, index, manifest) passes the gate first (children share it)."""

    def __init__(self, inner: Storage, gate: Gate | None = None) -> None:
        super().__init__(inner)
        self.gate = gate or Gate()

    def rewrap(self, inner: Storage) -> GatedStorage:
        return GatedStorage(inner, self.gate)

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.gate.pass_through()
        self.inner.write_bytes(key, data)

    def open_writer(self, key: str) -> StreamWriter:
        self.gate.pass_through()
        return self.inner.open_writer(key)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self.gate.pass_through()
        self.inner.create_exclusive(key, data)


def _config(url: str, options: dict[str, Any], **extra: Any) -> CheckpointConfig:
    return CheckpointConfig(
        output_dir=url, storage_options=options, max_shard_size=SHARD_SIZE, async_save=True, **extra
    )


def _differs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys whose values differ (tensors bit for bit)."""
    return sorted(k for k in a if not same_state(a[k], b[k]))


def save_while_training(
    rank: int, world_size: int, url: str, options: dict[str, Any], saves: int, keep: int
) -> dict[str, Any]:
    """Train and save asynchronously ``saves`` times back to back, rotating to ``keep`` checkpoints.

    Each save is held at its first write until the training loop has run
    three more steps (DDP all-reduces plus the loop's own collective) and
    changed every piece of state; then the gate opens and the loop runs two
    more steps while the background save writes and exchanges.
    """
    trainer = Trainer(rank, world_size)
    gated = GatedStorage(open_storage(url, **options))
    manager = CheckpointManager(_config(url, options, save_total_limit=keep), trainer, model=trainer.ddp,
                                storage=gated)
    paths: list[str] = []
    expected: list[bytes] = []
    mutated_keys: list[list[str]] = []
    pending_during_steps: list[bool] = []
    for _ in range(saves):
        trainer.step()
        trainer.step()
        snap = trainer.snapshot()
        # The previous save may still be writing (its thread runs at a lower priority): closing the
        # gate now would hold its writes while save_checkpoint() waits for it.
        manager.wait_until_finished()
        gated.gate.close()
        paths.append(manager.save_checkpoint())
        for _ in range(3):  # the background save is in flight, held at its first write on rank 0
            trainer.step()
        pending_during_steps.append(manager._background.pending)
        mutated_keys.append(_differs(snap, trainer.snapshot()))
        gated.gate.open()
        for _ in range(2):  # collectives on the default group while the background thread exchanges
            trainer.step()
        expected.append(to_bytes(snap))
    manager.wait_until_finished()
    final = trainer.snapshot()
    manager.close()
    dist.barrier()
    complete = [e.name for e in list_checkpoints(url, storage_options=options) if e.is_complete]
    return {
        "paths": paths,
        "expected": expected,
        "final": to_bytes(final),
        "mutated_keys": mutated_keys,
        "pending_during_steps": pending_during_steps,
        "held_writes": gated.gate.held,
        "collectives": trainer.collectives,
        "complete": complete,
        "latest": find_latest_checkpoint(url, storage_options=options),
    }


def load_in_fresh_process(
    rank: int, world_size: int, url: str, options: dict[str, Any], expected: list[bytes], previous: str | None
) -> dict[str, Any]:
    """Load the latest checkpoint (and ``previous`` by name) into a differently initialised trainer.

    ``expected`` holds every rank's state at save time of the latest checkpoint.
    """
    trainer = Trainer(rank, world_size, seed=7)
    wanted = from_bytes(expected[rank])
    before = _differs(wanted, trainer.snapshot())
    manager = CheckpointManager(_config(url, options), trainer, model=trainer.ddp)
    manager.load_checkpoint(None)
    assert manager.loaded_manifest is not None
    result: dict[str, Any] = {
        "differed_before": before,
        "loaded_path": manager.loaded_manifest.checkpoint_path,
        "loaded": to_bytes(trainer.snapshot()),
        "previous": None,
    }
    if previous is not None:
        manager.load_checkpoint(previous)
        result["previous"] = to_bytes(trainer.snapshot())
    manager.close()
    return result


def fail_in_background(
    rank: int,
    world_size: int,
    url: str,
    options: dict[str, Any],
    failing_rank: int,
    fail_after_ops: int,
    next_call: str,
) -> dict[str, Any]:
    """Commit one async save; then one whose storage fails on ``failing_rank`` in the background.

    The failure must reach every rank at ``next_call`` (``"wait"``:
    ``wait_until_finished``, ``"save"``: the next ``save_checkpoint``), once;
    then a healthy manager saves again.
    """
    trainer = Trainer(rank, world_size)
    trainer.step()
    committed = trainer.snapshot()
    with CheckpointManager(_config(url, options), trainer, model=trainer.ddp) as good:
        first = good.save_checkpoint()
        trainer.step()

    storage: Storage = open_storage(url, **options)
    faulty = FaultInjectingStorage(storage, fail_after_ops=fail_after_ops) if rank == failing_rank else None
    # No write probe: its requests would meet the injected fault at construction instead of in the background.
    manager = CheckpointManager(_config(url, options, retry=NO_RETRY, write_probe=False), trainer, model=trainer.ddp,
                                storage=faulty or storage)
    trainer.step()
    failed = manager.save_checkpoint()  # returns: the state is staged, the failure comes in the background
    for _ in range(3):
        trainer.step()
    outcome: dict[str, Any] = {"first": first, "failed": failed, "error": None, "message": "", "bases": []}
    try:
        if next_call == "wait":
            manager.wait_until_finished()
        else:
            manager.save_checkpoint()
    except CkptioError as exc:
        outcome.update(error=type(exc).__name__, message=str(exc),
                       bases=[c.__name__ for c in type(exc).__mro__])
    # Raised once: nothing is pending any more.
    manager.wait_until_finished()
    manager.close()
    outcome["tripped"] = faulty.tripped if faulty is not None else None
    outcome["fault_log"] = list(faulty.log) if faulty is not None else None
    dist.barrier()
    outcome["latest"] = find_latest_checkpoint(url, storage_options=options)
    complete = [e.name for e in list_checkpoints(url, storage_options=options) if e.is_complete]
    outcome["complete"] = complete

    # The background group still works: a healthy manager commits the next save.
    trainer.step()
    with CheckpointManager(_config(url, options), trainer, model=trainer.ddp) as healthy:
        outcome["recovered"] = healthy.save_checkpoint()
        for _ in range(2):
            trainer.step()
    dist.barrier()
    outcome["latest_after"] = find_latest_checkpoint(url, storage_options=options)

    # The checkpoint that stayed the latest loads what was committed.
    fresh = Trainer(rank, world_size, seed=3)
    CheckpointManager(_config(url, options), fresh, model=fresh.ddp).load_checkpoint(first)
    outcome["first_mismatches"] = _differs(committed, fresh.snapshot())
    return outcome
