"""A run of saves and resumes through a request-counting storage (not collected by pytest).

Shared by the request-count tests (world size 1 in process, 4 under gloo).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from manager_helpers import TinyTrainer

from ckptio import CheckpointConfig, CheckpointManager
from ckptio.checkpoint.manifest import forget_manifests
from ckptio.storage import CountingStorage, open_storage


def run(url: str, options: dict[str, Any], *, saves: int, measure: tuple[int, ...], limit: int | None) -> dict[str, Any]:
    """Save ``saves`` checkpoints; at each save number in ``measure`` record that save's requests and a resume's.

    A resume is measured with this process's memory of manifests cleared, as a
    freshly started process would resume.
    """
    trainer = TinyTrainer()
    counting = CountingStorage(open_storage(url, **options))
    config = CheckpointConfig(
        output_dir=url, storage_options=options, save_total_limit=limit, max_shard_size=256  # several shards
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
            resumed = TinyTrainer()
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
