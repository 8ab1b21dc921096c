"""A rank that dies during an asynchronous save makes the others fail, not hang."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "state"))

from async_death_workers import rank_dies_in_background  # noqa: E402
from state_spawn import run_ranks  # noqa: E402


def test_a_rank_dying_mid_save_fails_the_others_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    output, report = str(tmp_path / "run"), tmp_path / "rank0.json"
    with pytest.raises(AssertionError, match=r"never finished: \[1\]"):
        run_ranks(rank_dies_in_background, 2, output, str(report), timeout=120)
    outcome = json.loads(report.read_text())
    assert outcome["raised"] is not None, outcome
    assert "checkpoint-2" in outcome["message"]
    assert outcome["waited_s"] < 60  # the exchange timeout (20 s) at most, not the 30-minute default
    assert outcome["latest"].endswith("checkpoint-1")
