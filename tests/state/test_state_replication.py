from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from ckptio.errors import CheckpointError, InvalidArgumentError
from ckptio.state import (
    ReplicationMismatchError,
    ValidationLevel,
    World,
    check_replicated,
    state_digests,
)


@dataclass(frozen=True)
class _FakeWorld(World):
    """Rank 0 of a world whose other ranks hold ``others``' state; gathers replay their digests."""

    others: tuple[Any, ...] = ()
    level: str = "tensor"
    key: str = "c"
    gathers: list[int] = field(default_factory=list, compare=False)

    def all_gather_object(self, obj: Any) -> list[Any]:
        self.gathers.append(1)
        peers = [state_digests(o, key=self.key, level=self.level) for o in self.others]
        if isinstance(obj, str):  # the summary round
            from ckptio.state.replication import _summary

            return [obj, *(_summary(p) for p in peers)]
        return [obj, *peers]


def _check(mine: Any, *others: Any, level: str = "tensor") -> _FakeWorld:
    world = _FakeWorld(world_size=1 + len(others), others=others, level=level)
    check_replicated(mine, world, key="c", level=level)
    return world


def _optimizer_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return opt.state_dict()


def test_identical_copies_pass_with_one_gather() -> None:
    state = {"optimizer": _optimizer_state(), "bf16": torch.randn(5).to(torch.bfloat16), "nan": torch.tensor(float("nan"))}
    for level in ("quick", "tensor", "full"):
        world = _check(state, state, state, level=level)
        assert world.gathers == [1]


def test_world_of_one_and_level_none_do_no_collective() -> None:
    world = _FakeWorld(world_size=1, others=())
    check_replicated({"a": torch.zeros(1)}, world, key="c", level="tensor")
    two = _FakeWorld(world_size=2, others=({"a": torch.ones(1)},))
    check_replicated({"a": torch.zeros(1)}, two, key="c", level=ValidationLevel.NONE)
    assert world.gathers == [] and two.gathers == []


def test_nested_optimizer_state_mismatch_names_path_and_ranks() -> None:
    mine = {"optimizer": _optimizer_state()}
    other = {"optimizer": _optimizer_state()}
    other["optimizer"]["state"][1]["exp_avg"][0] += 1e-3
    with pytest.raises(ReplicationMismatchError) as info:
        _check(mine, mine, other)
    err = info.value
    assert isinstance(err, CheckpointError) and isinstance(err, ValueError)
    assert (err.key, err.mismatches, err.ranks) == ("c", [("c.optimizer.state.1.exp_avg", [2])], [2])
    assert "'c.optimizer.state.1.exp_avg' differs on ranks [2]" in str(err)
    assert "'c'" in str(err)


def test_bf16_one_bit_difference_is_detected_at_every_full_level() -> None:
    base = torch.randn(64).to(torch.bfloat16)
    flipped = base.clone()
    flipped.view(torch.int16)[7] ^= 1  # lowest mantissa bit
    assert not torch.equal(base.view(torch.int16), flipped.view(torch.int16))
    for level in ("tensor", "full"):
        with pytest.raises(ReplicationMismatchError, match="'c.w'"):
            _check({"w": base}, {"w": flipped}, level=level)


def test_quick_compares_a_sample_and_structure() -> None:
    base = torch.zeros(100_000)
    off_sample = base.clone()
    off_sample[1] = 1.0  # stride is 24: element 1 is not sampled
    _check({"w": base}, {"w": off_sample}, level="quick")
    on_sample = base.clone()
    on_sample[0] = 1.0
    with pytest.raises(ReplicationMismatchError):
        _check({"w": base}, {"w": on_sample}, level="quick")
    with pytest.raises(ReplicationMismatchError, match="'c.w'"):
        _check({"w": base}, {"w": base.reshape(10, -1)}, level="quick")


def test_nan_equals_same_nan_but_signed_zero_differs() -> None:
    _check({"w": torch.tensor([float("nan"), 1.0])}, {"w": torch.tensor([float("nan"), 1.0])})
    with pytest.raises(ReplicationMismatchError):
        _check({"w": torch.tensor([0.0])}, {"w": torch.tensor([-0.0])})


def test_non_tensor_leaves_missing_keys_and_dtypes() -> None:
    with pytest.raises(ReplicationMismatchError, match=r"'c.param_groups.0.lr' differs on ranks \[1\]"):
        _check({"param_groups": [{"lr": 0.1}]}, {"param_groups": [{"lr": 0.2}]})
    with pytest.raises(ReplicationMismatchError) as info:
        _check({"a": 1, "b": 2}, {"a": 1})
    assert info.value.mismatches == [("c", [1]), ("c.b", [1])]
    with pytest.raises(ReplicationMismatchError):
        _check({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)})


def test_many_mismatches_are_summarised() -> None:
    mine = {str(i): torch.zeros(1) for i in range(8)}
    other = {str(i): torch.ones(1) for i in range(8)}
    with pytest.raises(ReplicationMismatchError, match="and 3 more") as info:
        _check(mine, other)
    assert len(info.value.mismatches) == 8


def test_unknown_level_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="validation level"):
        check_replicated({}, World(), key="c", level="paranoid")


def test_digests_cover_odd_tensors() -> None:
    state = {
        "bool": torch.tensor([True, False]),
        "complex": torch.ones(2, dtype=torch.complex64),
        "scalar": torch.tensor(3),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "sparse": torch.eye(3).to_sparse(),
        "meta": torch.empty(2, device="meta"),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    digests = state_digests(state, key="k", level="tensor")
    assert sorted(digests) == sorted(["k", *(f"k.{name}" for name in state)])
    assert digests["k.strided"] == state_digests({"strided": torch.arange(12.0).reshape(3, 4).t().contiguous()}, key="k")["k.strided"]
