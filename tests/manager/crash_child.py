"""Child process for the crash tests: resumes, then saves checkpoints in a loop until killed.

Every parameter of checkpoint N holds the value N, and its progress step is N.

``crash_child.py URL OPTIONS_JSON [--async] [--keep=K] [--write-delay=S] [--report] [--stop-in-delete=D:K:MODE]``:
with ``--async`` the manager saves asynchronously, and right after each save
returns (the write still in flight) the child sets every value to ``-N``, as a
training step would change the state; checkpoint N must still hold N.
``--keep=K`` rotates to the K newest checkpoints (by default nothing is
rotated). ``--write-delay=S`` makes every write of the storage wait S seconds
first (slow storage: a kill then lands in the middle of a save more often).
``--report`` prints ``SAVED N`` once save N has returned (committed, rotated).
``--stop-in-delete=D:K:MODE`` stops in rotation: counting the storage
operations from the write of the ``delete`` marker that begins this child's
D-th checkpoint deletion (operation 0), before operation K the child prints
``STOPPED NAME K LAST_COMMITTED OPERATION KEY`` (NAME: the checkpoint of that
deletion; LAST_COMMITTED: the last checkpoint whose manifest it wrote); with
MODE ``pause`` it then sleeps (the parent kills it exactly there), with ``go``
it carries on (the parent kills it a moment later, wherever it has got to).
"""

from __future__ import annotations

import builtins
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptio import (
    CheckpointConfig,
    CheckpointManager,
    SharingPattern,
    StateComponent,
    TrainingProgress,
)
from ckptio.checkpoint.layout import IN_PROGRESS_NAME, MANIFEST_NAME
from ckptio.storage import (
    ObjectInfo,
    Storage,
    StorageWrapper,
    StreamWriter,
    open_storage,
)


class Provider:
    def __init__(self) -> None:
        self.progress = TrainingProgress()
        self.extra = TrainingProgress()

    def get_state_components(self) -> list[StateComponent]:
        return [
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
            StateComponent("shadow", self.extra, SharingPattern.PER_RANK),
        ]

    def get_process_groups(self) -> dict[str, Any]:
        return {}


class SlowWrites(StorageWrapper):
    """Every write waits ``delay`` seconds before it starts (children share the delay)."""

    def __init__(self, inner: Storage, delay: float = 0.0) -> None:
        super().__init__(inner)
        self.delay = delay

    def rewrap(self, inner: Storage) -> SlowWrites:
        return SlowWrites(inner, self.delay)

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        time.sleep(self.delay)
        self.inner.write_bytes(key, data)

    def open_writer(self, key: str) -> StreamWriter:
        time.sleep(self.delay)
        return self.inner.open_writer(key)

    def create_exclusive(self, key: str, data: bytes) -> None:
        time.sleep(self.delay)
        self.inner.create_exclusive(key, data)


@dataclass
class _StopState:
    deletion: int  # stop in the deletion-th deletion (1-based) ...
    operation: int  # ... before its operation-th operation (0: the delete marker write)
    pause: bool
    deletions: int = 0
    operations: int = -1  # operations since the current deletion began (-1: none began yet)
    name: str = ""
    committed: str = "-"  # the last checkpoint whose manifest went through this wrapper
    stopped: bool = False


class StopInDelete(StorageWrapper):
    """Stops (prints ``STOPPED``, then sleeps or carries on) at one operation of one checkpoint deletion.

    A deletion begins with the write of an in-progress marker whose action is ``delete``
    (:func:`ckptio.checkpoint.commit.delete_checkpoint`); from then on every operation
    through this wrapper or its children counts, whatever it is.
    """

    def __init__(self, inner: Storage, state: _StopState) -> None:
        super().__init__(inner)
        self.state = state

    def rewrap(self, inner: Storage) -> StopInDelete:
        return StopInDelete(inner, self.state)

    def _before(self, action: str, key: str, data: bytes | bytearray | memoryview | None = None) -> None:
        state = self.state
        if (action == "write" and key.rsplit("/", 1)[-1] == IN_PROGRESS_NAME and data is not None
                and b'"action": "delete"' in bytes(data)):
            state.deletions += 1
            if state.deletions == state.deletion:
                state.operations, state.name = -1, self.url.rstrip("/").rsplit("/", 1)[-1]
        if state.operations >= 0 or state.deletions == state.deletion:
            state.operations += 1
        if not state.stopped and state.operations == state.operation:
            state.stopped = True
            print("STOPPED", state.name, state.operation, state.committed, action, key or "-", flush=True)
            while state.pause:
                time.sleep(60)

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._before("write", key, data)
        self.inner.write_bytes(key, data)
        self._published(key)

    def open_writer(self, key: str) -> StreamWriter:
        self._before("open", key)
        return self.inner.open_writer(key)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self._before("create", key)
        self.inner.create_exclusive(key, data)
        self._published(key)

    def _published(self, key: str) -> None:
        if key.rsplit("/", 1)[-1] == MANIFEST_NAME:  # the commit point of a save
            self.state.committed = self.url_of(key).rstrip("/").rsplit("/", 2)[-2]

    def list(self, prefix: str = "") -> builtins.list[str]:
        self._before("list", prefix)
        return self.inner.list(prefix)

    def walk(self, prefix: str = "") -> builtins.list[str]:
        self._before("walk", prefix)
        return self.inner.walk(prefix)

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        self._before("list", prefix)
        return self.inner.list_objects(prefix)

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        self._before("delete", key)
        self.inner.delete(key, missing_ok=missing_ok)

    def delete_many(self, keys: Sequence[str]) -> None:
        self._before("delete_many", keys[0] if keys else "")
        self.inner.delete_many(keys)

    def delete_prefix(self, prefix: str) -> None:
        self._before("delete_prefix", prefix)
        self.inner.delete_prefix(prefix)


def build(
    url: str,
    options: dict[str, Any],
    *,
    async_save: bool = False,
    keep: int | None = None,
    write_delay: float = 0.0,
    stop: _StopState | None = None,
) -> tuple[CheckpointManager, nn.Module, Provider]:
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 64))
    provider = Provider()
    config = CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=200_000,
                              async_save=async_save, save_total_limit=keep)
    storage: Storage | None = SlowWrites(open_storage(url, **options), write_delay) if write_delay else None
    if stop is not None:
        storage = StopInDelete(storage or open_storage(url, **options), stop)
    return CheckpointManager(config, provider, model=model, storage=storage), model, provider


def _flag(flags: list[str], name: str) -> str | None:
    """The value of ``--name=value`` among ``flags`` (None: absent)."""
    return next((f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")), None)


def _set_all(model: nn.Module, provider: Provider, value: int) -> None:
    provider.progress.step = provider.extra.step = value
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def main() -> None:
    url, options = sys.argv[1], json.loads(sys.argv[2])
    flags = sys.argv[3:]
    async_save = "--async" in flags
    keep, delay, stop_at = _flag(flags, "keep"), _flag(flags, "write-delay"), _flag(flags, "stop-in-delete")
    stop = None
    if stop_at is not None:
        deletion, operation, mode = stop_at.split(":")
        stop = _StopState(int(deletion), int(operation), pause=mode == "pause")
    manager, model, provider = build(url, options, async_save=async_save, keep=int(keep) if keep else None,
                                     write_delay=float(delay) if delay else 0.0, stop=stop)
    if manager.resolve_checkpoint_path(None) is not None:
        manager.load_checkpoint(None)
    step = provider.progress.step
    print("READY", step, flush=True)
    while True:
        step += 1
        _set_all(model, provider, step)
        manager.save_checkpoint(checkpoint_id=step)
        if "--report" in flags:
            print("SAVED", step, flush=True)
        if async_save:  # the save is in flight: change everything it took
            _set_all(model, provider, -step)


if __name__ == "__main__":
    main()
