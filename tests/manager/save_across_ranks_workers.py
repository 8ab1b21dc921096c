"""What each gloo rank runs in the split-save and broadcast-resume tests (not collected by pytest)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from ckptio import (
    CheckpointConfig,
    CheckpointManager,
    SharingPattern,
    StateComponent,
    TrainingProgress,
)
from ckptio.checkpoint import find_latest_checkpoint
from ckptio.storage import (
    FaultInjectingStorage,
    Storage,
    StorageWrapper,
    StreamWriter,
    open_storage,
)

#: Small enough that the model below makes eight shards.
SHARD_SIZE = 1024


class Net(nn.Module):
    """Several tensors of different sizes and dtypes, one tied pair."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16))
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight  # tied: stored once
        self.register_buffer("steps", torch.randint(0, 1000, (5,)))
        self.register_buffer("mask", torch.rand(3) > 0.5)


class _RecordingWriter(StreamWriter):
    def __init__(self, inner: StreamWriter, storage: RecordingStorage, key: str) -> None:
        super().__init__(inner.url)
        self._inner = inner
        self._storage = storage
        self._key = key

    def _write(self, data: memoryview) -> int:
        return self._inner.write(data)

    def _commit(self) -> None:
        self._inner.commit()
        self._storage.note("commit", self._key)

    def _abort(self) -> None:
        self._inner.abort()


class RecordingStorage(StorageWrapper):
    """Records ``(kind, object name, time)`` of every write and read through it (children share the log).

    ``commit`` and ``write`` are noted once the object is published. Reports no
    local path, so local reads go through it too.
    """

    def __init__(self, inner: Storage, events: list[tuple[str, str, int]] | None = None) -> None:
        super().__init__(inner)
        self.events: list[tuple[str, str, int]] = events if events is not None else []

    def rewrap(self, inner: Storage) -> RecordingStorage:
        return RecordingStorage(inner, self.events)

    def note(self, kind: str, key: str) -> None:
        self.events.append((kind, self.url_of(key).rsplit("/", 1)[-1], time.time_ns()))

    def open_writer(self, key: str) -> StreamWriter:
        self.note("open", key)
        return _RecordingWriter(self.inner.open_writer(key), self, key)

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.inner.write_bytes(key, data)
        self.note("write", key)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self.inner.create_exclusive(key, data)
        self.note("write", key)

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self.note("read", key)
        return self.inner.read_bytes(key, start, end)

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        self.note("read", key)
        return self.inner.read_ranges(key, ranges)

    def local_path(self, key: str = "") -> str | None:
        return None


class Progress:
    """One component per rank (so a resume reads more than weights on every rank), or one replicated
    component checked across ranks (a collective in every save)."""

    def __init__(self, step: int, pattern: SharingPattern = SharingPattern.PER_RANK) -> None:
        self.progress = TrainingProgress()
        self.progress.step = step
        self.pattern = pattern

    def get_state_components(self) -> list[StateComponent]:
        checked = self.pattern is SharingPattern.REPLICATED
        return [StateComponent("progress", self.progress, self.pattern, validate_replication=checked)]

    def get_process_groups(self) -> dict[str, Any]:
        return {}


def _config(url: str, options: dict[str, Any], **extra: Any) -> CheckpointConfig:
    return CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=SHARD_SIZE, **extra)


def tensors_of(model: nn.Module) -> bytes:
    """Every state tensor (aliases too), as safetensors bytes: tensors themselves would cross the
    result queue as shared memory that dies with this process."""
    return safetensors.torch.save({name: t.detach().clone() for name, t in model.state_dict().items()})


def save_split(rank: int, world_size: int, url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Save one checkpoint (model only) through a recording storage; report what this rank did."""
    recording = RecordingStorage(open_storage(url, **options))
    manager = CheckpointManager(_config(url, options), None, model=Net(seed=0), storage=recording)
    path = manager.save_checkpoint()
    return {"path": path, "events": recording.events}


def fail_while_writing_shards(
    rank: int, world_size: int, url: str, options: dict[str, Any], failing_rank: int
) -> dict[str, Any]:
    """Save checkpoint 1; then save checkpoint 2 while ``failing_rank``'s storage fails mid-shard.

    A replicated component with a replication check (a collective) is saved too.
    """
    model = Net(seed=0)
    provider = Progress(1, SharingPattern.REPLICATED)
    CheckpointManager(_config(url, options), provider, model=model).save_checkpoint()
    storage: Storage = open_storage(url, **options)
    faulty = FaultInjectingStorage(storage, fail_after_bytes=100) if rank == failing_rank else None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    provider.progress.step = 2
    manager = CheckpointManager(_config(url, options), provider, model=model, storage=faulty or storage)
    outcome: dict[str, Any] = {"error": None, "message": ""}
    try:
        manager.save_checkpoint()
    except Exception as exc:  # noqa: BLE001 - the test inspects what every rank raised
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    outcome["tripped"] = faulty.tripped if faulty is not None else None
    dist.barrier()
    outcome["latest"] = find_latest_checkpoint(url, storage_options=options)
    return outcome


def resume(rank: int, world_size: int, url: str, options: dict[str, Any], broadcast: bool) -> dict[str, Any]:
    """Save (split), then resume a differently initialised model with ``load_broadcast=broadcast``."""
    saved = Net(seed=0)
    CheckpointManager(_config(url, options), Progress(100 + rank), model=saved).save_checkpoint()
    fresh = Net(seed=1 + rank)
    differed = not torch.equal(fresh.body[0].weight, saved.body[0].weight)
    provider = Progress(0)
    recording = RecordingStorage(open_storage(url, **options))
    config = _config(url, options, load_broadcast=broadcast)
    CheckpointManager(config, provider, model=fresh, storage=recording).load_checkpoint(None)
    return {
        "differed": differed,
        "events": recording.events,
        "tensors": tensors_of(fresh),
        "saved": tensors_of(saved),
        "tied": fresh.head.weight is fresh.embed.weight,
        "step": provider.progress.step,
    }


def resume_that_fails(rank: int, world_size: int, url: str, options: dict[str, Any], how: str) -> dict[str, Any]:
    """Resume with broadcast when it cannot work; every rank must raise, and none may hang.

    ``how``: ``"model"`` (the last rank built a model with an extra layer) or
    ``"shard"`` (a shard is overwritten with garbage of its size, so the node's reader fails).
    """
    path = CheckpointManager(_config(url, options), None, model=Net(seed=0)).save_checkpoint()
    if how == "shard" and rank == 0:
        shards = open_storage(path, **options)
        name = sorted(k for k in shards.list("") if k.endswith(".safetensors"))[0]
        shards.write_bytes(name, b"\xff" * len(shards.read_bytes(name)))
    dist.barrier()
    model = Net(seed=0)
    if how == "model" and rank == world_size - 1:
        model.extra = nn.Linear(2, 2)
    outcome: dict[str, Any] = {"error": None, "message": ""}
    try:
        CheckpointManager(_config(url, options, load_broadcast=True), None, model=model).load_checkpoint(None)
    except Exception as exc:  # noqa: BLE001 - the test inspects what every rank raised
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    return outcome
