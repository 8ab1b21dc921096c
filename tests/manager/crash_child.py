"""Child process for the crash tests: resumes, then saves checkpoints in a loop until killed.

Every parameter of checkpoint N holds the value N, and its progress step is N.
"""

from __future__ import annotations

import json
import sys
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


def build(url: str, options: dict[str, Any]) -> tuple[CheckpointManager, nn.Module, Provider]:
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 64))
    provider = Provider()
    config = CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=200_000)
    return CheckpointManager(config, provider, model=model), model, provider


def main() -> None:
    url, options = sys.argv[1], json.loads(sys.argv[2])
    manager, model, provider = build(url, options)
    if manager.resolve_checkpoint_path(None) is not None:
        manager.load_checkpoint(None)
    print("READY", provider.progress.step, flush=True)
    while True:
        provider.progress.step += 1
        provider.extra.step = provider.progress.step
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(provider.progress.step)
        manager.save_checkpoint(checkpoint_id=provider.progress.step)


if __name__ == "__main__":
    main()
