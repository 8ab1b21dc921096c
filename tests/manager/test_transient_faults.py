"""Saves and loads survive transient faults on every storage operation, and count their retries."""

from __future__ import annotations

import logging

import pytest
from manager_helpers import TinyTrainer, manager_for, same_state, state_of
from reliability_figures import record

from ckptio.errors import TransientStorageError
from ckptio.storage import (
    FaultInjectingStorage,
    RetryingStorage,
    RetryPolicy,
    open_storage,
)

#: Retries without sleeping; ten attempts make a 10% fault rate practically never exhaust them.
NO_DELAY = RetryPolicy(max_attempts=10, base_delay=0.0, max_delay=0.0, deadline=60)
ROUNDS = 100


def _retry_messages(records: list[logging.LogRecord]) -> list[str]:
    return [
        r.getMessage()
        for r in records
        if r.levelno == logging.DEBUG and r.name.startswith("ckptio") and "again" in r.getMessage()
        or r.levelno == logging.DEBUG and r.name.startswith("ckptio") and r.getMessage().startswith("retrying")
    ]


@pytest.mark.parametrize("backend_url", ["local", "memory", "s3"], indirect=True)
def test_saves_and_loads_survive_transient_faults_on_every_operation(backend_url, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="ckptio")
    real = open_storage(backend_url.url, retry=NO_DELAY, **backend_url.storage_options)
    faulty = FaultInjectingStorage(real, transient_rate=0.1, seed=1234)
    trainer = TinyTrainer()
    restored = TinyTrainer(seed=1)
    saver = manager_for(trainer, backend_url, storage=faulty, retry=NO_DELAY, save_total_limit=2)
    loader = manager_for(restored, backend_url, storage=faulty, retry=NO_DELAY)
    assert isinstance(saver.storage, RetryingStorage) and isinstance(loader.storage, RetryingStorage)

    for _ in range(ROUNDS):
        trainer.step()
        saver.save_checkpoint()
        saved = state_of(trainer)
        restored.step()
        assert not same_state(state_of(restored), saved)
        loader.load_checkpoint(None)
        assert same_state(state_of(restored), saved)

    retries = saver.storage.retries + loader.storage.retries
    assert faulty.transient_faults > 0
    # Every injected fault was retried once, at the layer that owns the operation.
    assert retries == faulty.transient_faults
    assert len(_retry_messages(caplog.records)) == retries
    record(
        "transient faults at 10%", backend=backend_url.name, rounds=ROUNDS, faults=faulty.transient_faults, retries=retries
    )


def test_faults_outlasting_the_policy_surface_as_a_transient_storage_error(backend_url) -> None:
    real = open_storage(backend_url.url, **backend_url.storage_options)
    faulty = FaultInjectingStorage(real, transient_rate=0.9, seed=5)
    trainer = TinyTrainer()
    policy = RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0)
    # Without the write probe, whose requests would meet the faults first (at construction).
    manager = manager_for(trainer, backend_url, storage=faulty, retry=policy, write_probe=False)
    with pytest.raises(TransientStorageError, match="still failing after 2 attempts") as caught:
        manager.save_checkpoint()
    assert backend_url.url.rstrip("/") in str(caught.value)
