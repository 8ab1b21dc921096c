"""A small trainer used by the manager tests (not collected by pytest)."""

from __future__ import annotations

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
from ckptio.storage import Storage


class TinyTrainer:
    """Model, optimizer, scheduler, progress and RNG, trained on random data."""

    def __init__(self, seed: int = 0, *, extra: list[StateComponent] | None = None) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.progress = TrainingProgress()
        self.rng = RNGState()
        self.extra = extra or []

    def get_state_components(self) -> list[StateComponent]:
        return [
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED),
            StateComponent("scheduler", self.scheduler, SharingPattern.GLOBAL),
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
            *self.extra,
        ]

    def get_process_groups(self) -> dict[str, Any]:
        return {}

    def step(self) -> float:
        x = torch.randn(16, 8)
        loss = self.model(x).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        return float(loss.item())


def manager_for(
    trainer: TinyTrainer, backend_url: Any, *, storage: Storage | None = None, **config: Any
) -> CheckpointManager:
    """A manager writing to the test's backend target."""
    cfg = CheckpointConfig(output_dir=backend_url.url, storage_options=backend_url.storage_options, **config)
    return CheckpointManager(cfg, trainer, model=trainer.model, storage=storage)


def state_of(trainer: TinyTrainer) -> dict[str, Any]:
    """Everything that must round-trip, for comparisons."""
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "progress": trainer.progress.state_dict(),
        "rng": trainer.rng.state_dict(),
    }


def same_state(a: Any, b: Any) -> bool:
    """Exact, recursive equality of nested state (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
