from __future__ import annotations

import collections
import io
import random
from typing import Any

import numpy as np
import pytest
import torch

from ckptio.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    StorageError,
)
from ckptio.state import (
    RNGState,
    TrainingProgress,
    load_component_state,
    save_component_state,
    unloadable_values,
)
from ckptio.storage import FaultInjectingStorage, Storage
from ckptio.storage.integrity import checksum_object

# torchdata calls the deprecated torch.set_vital when a StatefulDataLoader is built.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")


def _assert_same(a: Any, b: Any) -> None:
    """Nested equality with tensors compared exactly (bit patterns, dtype, shape)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _trained(optimizer_cls: Any, **kwargs: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    optimizer = optimizer_cls(model.parameters(), lr=0.1, **kwargs)
    for _ in range(2):
        model(torch.randn(3, 4, dtype=torch.bfloat16)).float().pow(2).sum().backward()
        optimizer.step()
    return model, optimizer


def _stateful_dicts() -> dict[str, Any]:
    from torchdata.stateful_dataloader import StatefulDataLoader

    states: dict[str, Any] = {}
    for name, cls, kwargs in [
        ("adam", torch.optim.Adam, {}),
        ("adamw", torch.optim.AdamW, {"weight_decay": 0.01}),
        ("sgd_momentum", torch.optim.SGD, {"momentum": 0.9}),
    ]:
        states[name] = _trained(cls, **kwargs)[1].state_dict()
    _, optimizer = _trained(torch.optim.SGD, momentum=0.9)
    schedulers = {
        "step_lr": torch.optim.lr_scheduler.StepLR(optimizer, 2),
        "cosine": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10),
        "one_cycle": torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.0, total_steps=10),
        "lambda_lr": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.9**epoch),
    }
    for name, scheduler in schedulers.items():
        optimizer.step()
        scheduler.step()
        states[name] = scheduler.state_dict()
    loader = StatefulDataLoader(torch.utils.data.TensorDataset(torch.arange(40)), batch_size=4, shuffle=True)
    batches = iter(loader)
    next(batches)
    states["dataloader"] = loader.state_dict()
    states["progress"] = TrainingProgress(step=3, tokens_seen=10, extra={"loss": [1.5, 1.25]}).state_dict()
    states["rng"] = RNGState().state_dict()
    states["plain"] = collections.OrderedDict(
        a={1, 2}, b=b"\x00", c=(1.5, None, True), d=torch.Size([2]), e=torch.bfloat16, f=1j, g=2**70
    )
    return states


def test_every_trainer_state_round_trips_with_weights_only(storage: Storage) -> None:
    states = _stateful_dicts()
    for name, state in states.items():
        record = save_component_state(storage, f"{name}_state.pt", state)
        assert record == checksum_object(storage, f"{name}_state.pt")
        _assert_same(load_component_state(storage, f"{name}_state.pt"), state)


def test_optimizer_resumes_into_a_fresh_instance(storage: Storage) -> None:
    model, optimizer = _trained(torch.optim.AdamW)
    save_component_state(storage, "optimizer_state.pt", optimizer.state_dict())
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    assert fresh.state_dict() != optimizer.state_dict()
    fresh.load_state_dict(load_component_state(storage, "optimizer_state.pt"))
    _assert_same(fresh.state_dict(), optimizer.state_dict())


def test_dataloader_resumes_at_the_same_batch(storage: Storage) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make() -> Any:
        return StatefulDataLoader(torch.utils.data.TensorDataset(torch.arange(40)), batch_size=4, shuffle=True)

    torch.manual_seed(5)
    loader = make()
    batches = iter(loader)
    next(batches)
    save_component_state(storage, "dataloader_state.pt", loader.state_dict())
    expected = [b[0].tolist() for b in batches]
    resumed = make()
    resumed.load_state_dict(load_component_state(storage, "dataloader_state.pt"))
    assert [b[0].tolist() for b in resumed] == expected


def test_rng_state_replays_after_load(storage: Storage) -> None:
    random.seed(1)
    save_component_state(storage, "rng_state_rank_0.pt", RNGState().state_dict())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    assert (random.random(), np.random.rand(), torch.rand(1).item()) != expected
    RNGState().load_state_dict(load_component_state(storage, "rng_state_rank_0.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_missing_file_names_the_url(storage: Storage) -> None:
    with pytest.raises(IncompleteCheckpointError, match="missing_state.pt") as info:
        load_component_state(storage, "missing_state.pt")
    assert storage.url_of("missing_state.pt") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_truncated_file_is_corrupt_and_left_alone(storage: Storage) -> None:
    save_component_state(storage, "opt_state.pt", _trained(torch.optim.Adam)[1].state_dict())
    data = storage.read_bytes("opt_state.pt")
    for cut in (0, 10, len(data) // 2, len(data) - 30):
        storage.write_bytes("cut_state.pt", data[:cut])
        with pytest.raises(CorruptCheckpointError) as info:
            load_component_state(storage, "cut_state.pt")
        assert storage.url_of("cut_state.pt") in str(info.value)
        assert storage.read_bytes("cut_state.pt") == data[:cut]


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("raise SystemExit('executed')",))


def test_unsafe_pickle_is_refused_not_executed(storage: Storage) -> None:
    buffer = io.BytesIO()
    torch.save({"x": _Evil()}, buffer)
    storage.write_bytes("evil_state.pt", buffer.getvalue())
    with pytest.raises(CorruptCheckpointError, match="weights_only") as info:
        load_component_state(storage, "evil_state.pt")
    assert storage.url_of("evil_state.pt") in str(info.value)


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": {"b": np.zeros(2)}}, "a.b"),
        ({"n": np.float32(1.0)}, "n"),
        ({"d": collections.defaultdict(int)}, "d"),
        ({"l": [1, slice(1, 2)]}, "l.1"),
    ],
)
def test_values_weights_only_would_refuse_are_rejected_at_save(storage: Storage, state: Any, path: str) -> None:
    assert [p for p, _ in unloadable_values(state)] == [path]
    with pytest.raises(InvalidArgumentError, match=f"'{path}'.*nothing was written") as info:
        save_component_state(storage, "bad_state.pt", state)
    assert storage.url_of("bad_state.pt") in str(info.value)
    assert not storage.exists("bad_state.pt")


def test_safe_globals_are_accepted() -> None:
    class Custom:
        pass

    assert len(unloadable_values({"x": Custom()})) == 1
    with torch.serialization.safe_globals([Custom]):
        assert unloadable_values({"x": Custom()}) == []


def test_failed_stream_publishes_nothing_and_keeps_the_old_file(storage: Storage) -> None:
    save_component_state(storage, "opt_state.pt", {"old": torch.zeros(4)})
    old = storage.read_bytes("opt_state.pt")
    faulty = FaultInjectingStorage(storage, fail_after_bytes=2000)
    with pytest.raises(StorageError):
        save_component_state(faulty, "opt_state.pt", {"new": torch.ones(100_000)})
    assert storage.read_bytes("opt_state.pt") == old
    assert storage.list() == ["opt_state.pt"]


def test_save_streams_instead_of_buffering(storage: Storage) -> None:
    writes: list[int] = []
    real_open = storage.open_writer

    def open_writer(key: str) -> Any:
        writer = real_open(key)
        inner_write = writer.write

        def write(data: Any) -> int:
            writes.append(memoryview(data).nbytes)
            return inner_write(data)

        writer.write = write  # type: ignore[method-assign]
        return writer

    storage.open_writer = open_writer  # type: ignore[method-assign]
    record = save_component_state(storage, "big_state.pt", {"a": torch.ones(2**18), "b": torch.zeros(2**18)})
    assert len(writes) > 2
    assert max(writes) < record.size
    assert sum(writes) == record.size
