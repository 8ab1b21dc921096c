from __future__ import annotations

import io

import pytest
import torch

from ckptio.errors import InvalidArgumentError
from ckptio.state import TrainingProgress


def test_round_trip_through_weights_only_torch_load() -> None:
    saved = TrainingProgress(step=12, epoch=2, tokens_seen=4096, samples_seen=96, extra={"best": 0.5, "tag": "a"})
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    restored = TrainingProgress()
    assert restored != saved
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored == saved


def test_state_dict_is_a_snapshot() -> None:
    progress = TrainingProgress(extra={"history": [1]})
    state = progress.state_dict()
    progress.step = 5
    progress.extra["history"].append(2)
    assert state == {"step": 0, "epoch": 0, "tokens_seen": 0, "samples_seen": 0, "extra": {"history": [1]}}


def test_missing_counters_keep_their_values() -> None:
    progress = TrainingProgress(step=3, epoch=1)
    progress.load_state_dict({"step": 7})
    assert (progress.step, progress.epoch, progress.extra) == (7, 1, {})


@pytest.mark.parametrize("state", [[1], {"step": "7"}, {"epoch": 1.5}, {"step": True}, {"extra": [1]}])
def test_malformed_state_is_refused_and_changes_nothing(state: object) -> None:
    progress = TrainingProgress(step=3)
    with pytest.raises(InvalidArgumentError):
        progress.load_state_dict(state)  # type: ignore[arg-type]
    assert progress == TrainingProgress(step=3)
