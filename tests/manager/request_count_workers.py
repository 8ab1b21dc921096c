"""A run of saves and resumes through a request-counting storage (not collected by pytest).

Shared by the request-count tests (world size 1 in process, 4 under gloo).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from ckptio import (
    CheckpointConfig,
    CheckpointManager,
    RNGState,
    SharingPattern,
    StateComponent,
    TrainingProgress,
)
from ckptio.checkpoint.manifest import forget_manifests
from ckptio.storage import CountingStorage, open_storage


class Trainer:
    """A small model in several shards, an optimizer, a scheduler, progress and per-rank RNG."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2)
        self.progress = TrainingProgress()
        self.rng = RNGState()

    def get_state_components(self) -> list[StateComponent]:
        return [
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED),
            StateComponent("scheduler", self.scheduler, SharingPattern.GLOBAL),
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
        ]

    def get_process_groups(self) -> dict[str, Any]:
        return {}


def run(url: str, options: dict[str, Any], *, saves: int, measure: tuple[int, ...], limit: int | None) -> dict[str, Any]:
    """Save ``saves`` checkpoints; at each save number in ``measure`` record that save's requests and a resume's.

    A resume is measured with this process's memory of manifests cleared, as a
    freshly started process would resume.
    """
    trainer = Trainer()
    counting = CountingStorage(open_storage(url, **options))
    config = CheckpointConfig(
        output_dir=url, storage_options=options, save_total_limit=limit, max_shard_size=16 * 1024
    )
    manager = CheckpointManager(config, trainer, model=trainer.model, storage=counting)
    result: dict[str, Any] = {}
    for number in range(1, saves + 1):
        trainer.progress.step = number
        counting.reset()
        manager.save_checkpoint()
        if number in measure:
            result[f"save@{number}"] = dict(counting.requests)
            forget_manifests()
            counting.reset()
            resumed = Trainer()
            CheckpointManager(config, resumed, model=resumed.model, storage=counting).load_checkpoint(None)
            result[f"resume@{number}"] = dict(counting.requests)
            result[f"resumed_step@{number}"] = resumed.progress.step
    return result


def run_rank(rank: int, world_size: int, url: str, saves: int, measure: tuple[int, ...], limit: int | None) -> Any:
    """``run`` on one gloo rank."""
    return run(url, {}, saves=saves, measure=measure, limit=limit)


def metadata_requests(counts: dict[str, int]) -> int:
    """Requests that only learn about objects: listings, stats, existence checks."""
    return sum(n for kind, n in Counter(counts).items() if kind in ("list", "stat", "exists"))
