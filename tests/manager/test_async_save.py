"""Asynchronous saves (SPEC 3a): snapshot semantics, one save in flight, errors surfaced, memory refused."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from manager_helpers import TinyTrainer, manager_for, same_state, state_of

from ckptio import (
    CheckpointError,
    CkptioError,
    InsufficientMemoryError,
    find_latest_checkpoint,
)
from ckptio.checkpoint import list_checkpoints
from ckptio.state import SharingPattern, StateComponent
from ckptio.storage import (
    FaultInjectingStorage,
    InjectedFault,
    RetryPolicy,
    open_storage,
)

NO_RETRY = RetryPolicy(max_attempts=1)


class NestedState:
    """A component whose state nests tensors in dicts, lists and tuples, with a mutable list leaf."""

    def __init__(self) -> None:
        self.table = torch.arange(1000, dtype=torch.float32)
        self.history: list[int] = [1, 2, 3]
        self.pair = (torch.ones(3), {"count": 5})

    def state_dict(self) -> dict:
        return {"table": self.table, "deep": {"items": [self.table[:10], self.pair]}, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.table.copy_(state["table"])
        self.history[:] = state["history"]
        self.pair[0].copy_(state["deep"]["items"][1][0])


def _trainer() -> tuple[TinyTrainer, NestedState]:
    nested = NestedState()
    return TinyTrainer(extra=[StateComponent("nested", nested, SharingPattern.GLOBAL)]), nested


def _mutate(trainer: TinyTrainer, nested: NestedState) -> None:
    """Change every kind of state in place, as a training step right after the save would."""
    trainer.step()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    nested.table.mul_(-1)
    nested.pair[0].add_(7)
    nested.history.append(4)


def _restore(backend_url, path: str) -> tuple[TinyTrainer, NestedState]:
    trainer, nested = _trainer()
    nested.table.zero_()
    manager_for(trainer, backend_url).load_checkpoint(path)
    return trainer, nested


def test_changes_after_the_call_returns_never_reach_the_checkpoint(backend_url) -> None:
    trainer, nested = _trainer()
    trainer.step()
    expected, expected_table = copy.deepcopy(state_of(trainer)), nested.table.clone()
    manager = manager_for(trainer, backend_url, async_save=True)
    path = manager.save_checkpoint()
    _mutate(trainer, nested)  # while the background write may still be running
    assert not same_state(state_of(trainer), expected)
    manager.wait_until_finished()
    restored, restored_nested = _restore(backend_url, path)
    assert same_state(state_of(restored), expected)
    assert torch.equal(restored_nested.table, expected_table)
    assert restored_nested.history == [1, 2, 3]
    assert torch.equal(restored_nested.pair[0], torch.ones(3))


def test_back_to_back_saves_each_hold_their_own_state(backend_url) -> None:
    trainer, nested = _trainer()
    states, paths = [], []
    with manager_for(trainer, backend_url, async_save=True, save_total_limit=5) as manager:
        for _ in range(3):
            trainer.step()
            states.append(copy.deepcopy(state_of(trainer)))
            paths.append(manager.save_checkpoint())  # waits for the previous save first
            _mutate(trainer, nested)
    assert [p.rsplit("-", 1)[1] for p in paths] == ["1", "2", "3"]
    assert find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options) == paths[-1]
    for path, expected in zip(paths, states, strict=True):
        restored, _ = _restore(backend_url, path)
        assert same_state(state_of(restored), expected)


def test_load_waits_for_the_pending_save(backend_url) -> None:
    trainer, _ = _trainer()
    trainer.step()
    expected = copy.deepcopy(state_of(trainer))
    manager = manager_for(trainer, backend_url, async_save=True)
    path = manager.save_checkpoint()
    trainer.step()
    manager.load_checkpoint(None)  # must see the checkpoint just saved, committed
    assert same_state(state_of(trainer), expected)
    assert manager.resolve_checkpoint_path(None) == path
    manager.close()


def test_a_background_failure_surfaces_once_on_the_next_call(backend_url) -> None:
    real = open_storage(backend_url.url, **backend_url.storage_options)
    trainer, _ = _trainer()
    good = manager_for(trainer, backend_url, async_save=True)
    first = good.save_checkpoint()
    good.close()
    faulty = FaultInjectingStorage(real, fail_after_ops=3)
    # No write probe: its requests would meet the injected fault at construction instead of in the background.
    manager = manager_for(trainer, backend_url, storage=faulty, async_save=True, retry=NO_RETRY, write_probe=False)
    failed = manager.save_checkpoint()  # returns: the failure happens in the background
    with pytest.raises(CkptioError) as raised:
        manager.save_checkpoint()
    assert failed in str(raised.value)
    assert isinstance(raised.value, InjectedFault)
    assert faulty.tripped
    assert find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options) == first
    complete = [e.name for e in list_checkpoints(backend_url.url, storage_options=backend_url.storage_options)
                if e.is_complete]
    assert complete == ["checkpoint-1"]
    manager.wait_until_finished()  # raised once: nothing pending any more
    manager.close()


def test_a_bug_in_the_background_is_a_checkpoint_error_naming_the_checkpoint(backend_url, monkeypatch) -> None:
    trainer, _ = _trainer()
    manager = manager_for(trainer, backend_url, async_save=True)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(manager, "_write_metrics", broken)
    path = manager.save_checkpoint(metrics={"loss": 1.0})
    with pytest.raises(CheckpointError, match="boom") as raised:
        manager.wait_until_finished()
    assert path in str(raised.value)
    assert find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options) is None
    monkeypatch.undo()
    assert manager.save_checkpoint(metrics={"loss": 1.0}).endswith("checkpoint-2")  # the error was raised once
    manager.close()


def test_a_save_that_cannot_be_staged_in_memory_is_refused_before_writing(backend_url, monkeypatch) -> None:
    trainer, _ = _trainer()
    manager = manager_for(trainer, backend_url, async_save=True)
    first = manager.save_checkpoint()
    manager.wait_until_finished()
    manager.close()  # drops the staging buffers: the next save must allocate again
    monkeypatch.setattr(manager._stager, "_available_memory", lambda: 1024)
    with pytest.raises(InsufficientMemoryError, match="host memory") as raised:
        manager.save_checkpoint()
    assert "checkpoint-2" in str(raised.value)
    names = [e.name for e in list_checkpoints(backend_url.url, storage_options=backend_url.storage_options)]
    assert names == ["checkpoint-1"]
    assert find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options) == first


def test_staging_buffers_are_reused_from_one_save_to_the_next(backend_url) -> None:
    trainer, _ = _trainer()
    trainer.step()  # the optimizer has its moments before the first save
    with manager_for(trainer, backend_url, async_save=True) as manager:
        manager.save_checkpoint()
        manager.wait_until_finished()
        held = manager._stager.nbytes
        pointers = {b.tensor.data_ptr() for b in manager._stager._buffers.values()}
        trainer.step()
        manager.save_checkpoint()
        manager.wait_until_finished()
        assert manager._stager.nbytes == held
        assert {b.tensor.data_ptr() for b in manager._stager._buffers.values()} == pointers
    assert manager._stager.nbytes == 0  # close() releases them


def test_the_save_runs_on_a_background_thread(backend_url, monkeypatch) -> None:
    trainer, _ = _trainer()
    manager = manager_for(trainer, backend_url, async_save=True)
    threads: list[tuple[str, int]] = []
    original = manager._write_and_commit
    release = threading.Event()

    def spy(*args, **kwargs):
        niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        threads.append((threading.current_thread().name, niceness))
        release.wait(timeout=60)
        return original(*args, **kwargs)

    monkeypatch.setattr(manager, "_write_and_commit", spy)
    manager.save_checkpoint()
    assert manager.save_in_progress  # returned while the save is held in the background
    release.set()
    manager.wait_until_finished()
    assert not manager.save_in_progress
    manager.close()
    [(name, niceness)] = threads
    assert name.startswith("ckptio-async-save")
    if sys.platform.startswith("linux"):  # the trainer keeps its CPU priority; the writer yields to it
        assert niceness == os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 10


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_interpreter_exit_waits_for_the_pending_save(backend_url) -> None:
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from ckptio import CheckpointConfig, CheckpointManager
        model = nn.Linear(512, 512)
        config = CheckpointConfig(output_dir={backend_url.url!r}, storage_options={backend_url.storage_options!r},
                                  async_save=True)
        CheckpointManager(config, None, model=model).save_checkpoint()
        # no close(), no wait: the interpreter exits with the save in flight
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    latest = find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options)
    assert latest is not None and latest.endswith("checkpoint-1")
