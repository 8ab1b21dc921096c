from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import pytest
import torch

from ckptio.errors import InvalidArgumentError
from ckptio.state import RNGState, RNGStateWarning


def _draw() -> tuple[list[float], list[float], list[float], float]:
    return (
        [random.random() for _ in range(5)],
        np.random.rand(5).tolist(),
        torch.rand(5).tolist(),
        random.gauss(0.0, 1.0),  # leaves a cached gauss_next behind
    )


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # type: ignore[no-any-return]


def test_restore_replays_every_cpu_generator() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    np.random.standard_normal()  # NumPy caches the second gaussian of a pair
    rng = RNGState()
    state = rng.state_dict()
    after_snapshot = _draw()
    moved_on = _draw()
    assert moved_on != after_snapshot
    rng.load_state_dict(state)
    assert _draw() == after_snapshot


def test_state_survives_weights_only_torch_load() -> None:
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    state = _round_trip(RNGState().state_dict())
    expected = _draw()
    _draw()
    assert _draw() != expected
    RNGState().load_state_dict(state)
    assert _draw() == expected


def test_state_holds_only_plain_types() -> None:
    state = RNGState().state_dict()
    assert sorted(state) == ["cuda", "format", "numpy", "python", "torch"]
    assert isinstance(state["python"]["state"], torch.Tensor)
    assert state["python"]["state"].shape == (625,)
    assert isinstance(state["numpy"]["keys"], torch.Tensor)
    assert state["numpy"]["keys"].shape == (624,)
    assert state["cuda"] == [] or all(isinstance(s, torch.Tensor) for s in state["cuda"])


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.pop("numpy"),
        lambda s: s.update(torch="no"),
        lambda s: s["numpy"].update(keys=torch.zeros(3, dtype=torch.int64)),
        lambda s: s["python"].update(state=torch.zeros(3, dtype=torch.int64)),
        lambda s: s.update(cuda=["x"]),
    ],
)
def test_malformed_state_changes_no_generator(corrupt: Any) -> None:
    state = RNGState().state_dict()
    corrupt(state)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    before = RNGState().state_dict()
    with pytest.raises(InvalidArgumentError):
        RNGState().load_state_dict(state)
    after = RNGState().state_dict()
    assert torch.equal(after["python"]["state"], before["python"]["state"])
    assert torch.equal(after["numpy"]["keys"], before["numpy"]["keys"])
    assert torch.equal(after["torch"], before["torch"])


class _FakeCuda:
    """Stands in for torch.cuda with ``n`` devices, recording what is restored."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.restored: dict[int, torch.Tensor] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: self.n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.n)
        monkeypatch.setattr(
            torch.cuda, "get_rng_state_all", lambda: [torch.full((4,), d, dtype=torch.uint8) for d in range(self.n)]
        )
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: self.restored.__setitem__(d, s))


def test_cuda_states_are_captured_and_restored_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(2)
    cuda.install(monkeypatch)
    state = RNGState().state_dict()
    assert [s.tolist() for s in state["cuda"]] == [[0] * 4, [1] * 4]
    RNGState().load_state_dict(state)
    assert {d: s.tolist() for d, s in cuda.restored.items()} == {0: [0] * 4, 1: [1] * 4}


def test_cuda_device_count_change_warns_and_restores_what_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeCuda(3).install(monkeypatch)
    state = RNGState().state_dict()
    fewer = _FakeCuda(2)
    fewer.install(monkeypatch)
    with pytest.warns(RNGStateWarning, match="3 CUDA generator"):
        RNGState().load_state_dict(state)
    assert sorted(fewer.restored) == [0, 1]


def test_cuda_state_without_cuda_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeCuda(1).install(monkeypatch)
    state = RNGState().state_dict()
    _FakeCuda(0).install(monkeypatch)
    with pytest.warns(RNGStateWarning, match="0 CUDA device"):
        RNGState().load_state_dict(state)


def test_include_cuda_false_ignores_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(2)
    cuda.install(monkeypatch)
    rng = RNGState(include_cuda=False)
    state = rng.state_dict()
    assert state["cuda"] == []
    rng.load_state_dict(RNGState().state_dict())
    assert cuda.restored == {}
