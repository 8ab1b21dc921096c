"""Child process for the crash tests: resumes, then saves checkpoints in a loop until killed.

Every parameter of checkpoint N holds the value N, and its progress step is N.

``crash_child.py URL OPTIONS_JSON [--async] [--keep=K] [--write-delay=S]``:
with ``--async`` the manager saves asynchronously, and right after each save
returns (the write still in flight) the child sets every value to ``-N``, as a
training step would change the state; checkpoint N must still hold N.
``--keep=K`` rotates to the K newest checkpoints (by default nothing is
rotated). ``--write-delay=S`` makes every write of the storage wait S seconds
first (slow storage: a kill then lands in the middle of a save more often).
"""

from __future__ import annotations

import json
import sys
import time
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
from ckptio.storage import Storage, StorageWrapper, StreamWriter, open_storage


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


def build(
    url: str,
    options: dict[str, Any],
    *,
    async_save: bool = False,
    keep: int | None = None,
    write_delay: float = 0.0,
) -> tuple[CheckpointManager, nn.Module, Provider]:
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 64))
    provider = Provider()
    config = CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=200_000,
                              async_save=async_save, save_total_limit=keep)
    storage = SlowWrites(open_storage(url, **options), write_delay) if write_delay else None
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
    keep, delay = _flag(flags, "keep"), _flag(flags, "write-delay")
    manager, model, provider = build(url, options, async_save=async_save, keep=int(keep) if keep else None,
                                     write_delay=float(delay) if delay else 0.0)
    if manager.resolve_checkpoint_path(None) is not None:
        manager.load_checkpoint(None)
    step = provider.progress.step
    print("READY", step, flush=True)
    while True:
        step += 1
        _set_all(model, provider, step)
        manager.save_checkpoint(checkpoint_id=step)
        if async_save:  # the save is in flight: change everything it took
            _set_all(model, provider, -step)


if __name__ == "__main__":
    main()
