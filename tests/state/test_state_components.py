from __future__ import annotations

import pytest
import torch

from ckptio.errors import InvalidArgumentError
from ckptio.state import (
    RNGState,
    SharingPattern,
    StateComponent,
    Stateful,
    StatefulProvider,
    StatefulProviderBase,
    TrainingProgress,
    ValidationLevel,
    process_groups_of,
)


def test_enum_values_are_the_spec_strings() -> None:
    assert [p.value for p in SharingPattern] == ["global", "per_rank", "replicated", "per_group", "per_node"]
    assert [v.value for v in ValidationLevel] == ["none", "quick", "tensor", "full"]
    assert SharingPattern.PER_RANK == "per_rank"
    assert str(SharingPattern.PER_NODE) == "per_node"
    assert f"{ValidationLevel.QUICK}" == "quick"


def _stateful_objects() -> list[object]:
    from torchdata.stateful_dataloader import StatefulDataLoader

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    loader = StatefulDataLoader(torch.utils.data.TensorDataset(torch.arange(4)))
    return [module, optimizer, scheduler, loader, TrainingProgress(), RNGState()]


# torchdata calls the deprecated torch.set_vital when a StatefulDataLoader is built.
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
def test_modules_optimizers_schedulers_loaders_are_stateful_without_wrappers() -> None:
    objects = _stateful_objects()
    assert [isinstance(o, Stateful) for o in objects] == [True] * len(objects)
    assert not isinstance(object(), Stateful)


def test_component_defaults_and_string_coercion() -> None:
    c = StateComponent("optimizer", TrainingProgress(), "replicated", validate_replication=True, validation_level="quick")
    assert c.sharing_pattern is SharingPattern.REPLICATED
    assert c.validation_level is ValidationLevel.QUICK
    assert c.validation_level == "quick"
    d = StateComponent("rng", RNGState(), SharingPattern.PER_RANK)
    assert (d.required, d.validate_replication, d.validation_level, d.metadata) == (True, False, "tensor", {})
    assert d.process_group_name is None


def test_metadata_default_is_not_shared() -> None:
    a = StateComponent("a", TrainingProgress(), SharingPattern.GLOBAL)
    b = StateComponent("b", TrainingProgress(), SharingPattern.GLOBAL)
    a.metadata["x"] = 1
    assert b.metadata == {}


def test_per_group_requires_process_group_name() -> None:
    with pytest.raises(ValueError, match="process_group_name") as info:
        StateComponent("tp", TrainingProgress(), SharingPattern.PER_GROUP)
    assert isinstance(info.value, InvalidArgumentError)
    c = StateComponent("tp", TrainingProgress(), SharingPattern.PER_GROUP, process_group_name="tp")
    assert c.process_group_name == "tp"


@pytest.mark.parametrize("pattern", [p for p in SharingPattern if p is not SharingPattern.REPLICATED])
def test_validate_replication_only_with_replicated(pattern: SharingPattern) -> None:
    group = "g" if pattern is SharingPattern.PER_GROUP else None
    with pytest.raises(InvalidArgumentError, match="validate_replication"):
        StateComponent("x", TrainingProgress(), pattern, process_group_name=group, validate_replication=True)


@pytest.mark.parametrize("key", ["", "a/b", "../x", ".hidden", "-x", "a b", "a\\b", 3, None])
def test_key_must_be_a_file_name_fragment(key: object) -> None:
    with pytest.raises(InvalidArgumentError, match="key"):
        StateComponent(key, TrainingProgress(), SharingPattern.GLOBAL)  # type: ignore[arg-type]


def test_group_name_must_be_a_file_name_fragment() -> None:
    with pytest.raises(InvalidArgumentError, match="process_group_name"):
        StateComponent("x", TrainingProgress(), SharingPattern.PER_GROUP, process_group_name="a/b")


@pytest.mark.parametrize(
    ("field", "value"), [("sharing_pattern", "sideways"), ("validation_level", "thorough"), ("stateful", object())]
)
def test_bad_values_are_refused(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"key": "x", "stateful": TrainingProgress(), "sharing_pattern": "global"}
    kwargs[field] = value
    with pytest.raises(InvalidArgumentError):
        StateComponent(**kwargs)  # type: ignore[arg-type]


def test_metadata_must_be_json() -> None:
    with pytest.raises(InvalidArgumentError, match="JSON"):
        StateComponent("x", TrainingProgress(), "global", metadata={"t": torch.zeros(1)})


class _Trainer(StatefulProviderBase):
    def get_state_components(self) -> list[StateComponent]:
        return [StateComponent("progress", TrainingProgress(), SharingPattern.GLOBAL)]


class _Bare:
    def get_state_components(self) -> list[StateComponent]:
        return []


def test_providers_default_to_no_process_groups() -> None:
    trainer = _Trainer()
    assert isinstance(trainer, StatefulProvider)
    assert process_groups_of(trainer) == {}
    assert process_groups_of(_Bare()) == {}
    assert process_groups_of(None) == {}
    with pytest.raises(NotImplementedError):
        StatefulProviderBase().get_state_components()


def test_process_groups_of_refuses_non_dicts() -> None:
    class Bad(_Bare):
        def get_process_groups(self) -> list[int]:
            return [1]

    with pytest.raises(InvalidArgumentError, match="dict"):
        process_groups_of(Bad())
