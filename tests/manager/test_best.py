"""Best-checkpoint ranking (pure logic)."""

from __future__ import annotations

import math

import pytest

from ckptio.checkpoint.best import BestEntry, infer_greater_is_better, rank_best


def entry(name: str, value: float, greater: bool = False, key: str = "loss") -> BestEntry:
    return BestEntry(name, key, value, greater)


def test_lower_loss_wins_and_list_is_capped() -> None:
    best: list[BestEntry] = []
    best, kept = rank_best(best, entry("checkpoint-1", 0.9), keep=2)
    assert kept
    best, kept = rank_best(best, entry("checkpoint-2", 0.5), keep=2)
    assert kept
    best, kept = rank_best(best, entry("checkpoint-3", 0.7), keep=2)
    assert kept and [e.name for e in best] == ["checkpoint-2", "checkpoint-3"]
    best, kept = rank_best(best, entry("checkpoint-4", 1.5), keep=2)
    assert not kept and [e.name for e in best] == ["checkpoint-2", "checkpoint-3"]


def test_zero_is_a_metric() -> None:
    best, _ = rank_best([], entry("checkpoint-1", 0.3), keep=1)
    best, kept = rank_best(best, entry("checkpoint-2", 0.0), keep=1)
    assert kept and best[0].name == "checkpoint-2"
    acc, _ = rank_best([], entry("checkpoint-1", 0.0, greater=True, key="accuracy"), keep=1)
    acc, kept = rank_best(acc, entry("checkpoint-2", 0.1, greater=True, key="accuracy"), keep=1)
    assert kept and acc[0].name == "checkpoint-2"


def test_ties_keep_the_older_checkpoint() -> None:
    best, _ = rank_best([], entry("checkpoint-1", 0.5), keep=1)
    best, kept = rank_best(best, entry("checkpoint-2", 0.5), keep=1)
    assert not kept and best[0].name == "checkpoint-1"


def test_same_checkpoint_is_replaced_not_duplicated() -> None:
    best, _ = rank_best([], entry("checkpoint-1", 0.5), keep=3)
    best, _ = rank_best(best, entry("checkpoint-1", 0.4), keep=3)
    assert best == [entry("checkpoint-1", 0.4)]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_metrics_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        rank_best([], entry("checkpoint-1", value), keep=1)


def test_direction_is_inferred_from_the_metric_name() -> None:
    assert not infer_greater_is_better("eval_loss")
    assert not infer_greater_is_better("perplexity")
    assert infer_greater_is_better("accuracy")


def test_json_round_trip() -> None:
    e = entry("checkpoint-3", 0.25)
    assert BestEntry.from_json(e.to_json()) == e
