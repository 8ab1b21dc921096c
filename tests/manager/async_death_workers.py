"""What each gloo rank runs in the test of a rank dying during an async save (not collected by pytest)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from ckptio import CheckpointConfig, CheckpointManager, CkptioError
from ckptio.checkpoint import find_latest_checkpoint


def rank_dies_in_background(rank: int, world_size: int, output: str, report: str) -> None:
    """Save once together, then rank 1 dies in the middle of the second background save."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    config = CheckpointConfig(output_dir=output, async_save=True, async_timeout_s=20)
    manager = CheckpointManager(config, None, model=model)
    manager.save_checkpoint()
    manager.wait_until_finished()
    if rank == 1:
        def die(*args: object, **kwargs: object) -> None:
            os._exit(3)  # a rank killed with its save in flight: no clean-up, no report

        manager._write_and_commit = die  # type: ignore[method-assign]
    manager.save_checkpoint()
    started = time.monotonic()
    outcome: dict[str, object] = {"raised": None}
    try:
        manager.wait_until_finished()
    except CkptioError as exc:
        outcome = {"raised": type(exc).__name__, "message": str(exc)}
    outcome["waited_s"] = time.monotonic() - started
    outcome["latest"] = find_latest_checkpoint(output)
    Path(report).write_text(json.dumps(outcome))
