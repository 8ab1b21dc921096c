"""Crash safety: SIGKILL at random moments, and a failure at every position of a save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from crash_child import build

from ckptio import CheckpointError, find_latest_checkpoint
from ckptio.checkpoint import list_checkpoints
from ckptio.storage import (
    FaultInjectingStorage,
    InjectedFault,
    SimulatedCrash,
    open_storage,
)

CHILD = str(Path(__file__).with_name("crash_child.py"))
KILLS = 10


def assert_latest_loads_completely(backend_url, storage=None) -> int:
    """Load the latest checkpoint into fresh objects; its values must be its own step's."""
    latest = find_latest_checkpoint(storage or backend_url.url, storage_options=backend_url.storage_options)
    assert latest is not None
    manager, model, provider = build(backend_url.url, backend_url.storage_options)
    manager.load_checkpoint(None)
    step = provider.progress.step
    assert latest.endswith(f"checkpoint-{step}")
    assert provider.extra.step == step
    assert all(torch.all(p == step) for p in model.parameters())
    return step


def complete_names(backend_url) -> set[str]:
    return {e.name for e in list_checkpoints(backend_url.url, storage_options=backend_url.storage_options)
            if e.is_complete}


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_checkpoint(backend_url) -> None:
    if backend_url.name not in ("local", "s3"):
        pytest.skip("crash loop runs on local disk and S3")
    rng = random.Random(20261124)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(CHILD).parent)}
    argv = [sys.executable, CHILD, backend_url.url, json.dumps(backend_url.storage_options)]
    seen: set[str] = set()
    steps = []
    for _ in range(KILLS):
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) as child:
            assert child.stdout is not None
            assert child.stdout.readline().startswith("READY")
            time.sleep(rng.uniform(0.05, 1.0))
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        now = complete_names(backend_url)
        assert seen <= now, f"complete checkpoints disappeared: {sorted(seen - now)}"
        seen = now
        steps.append(assert_latest_loads_completely(backend_url))
    assert steps == sorted(steps) and steps[-1] >= KILLS  # progress was made between kills


@pytest.mark.parametrize("crash", [False, True], ids=["error", "crash"])
def test_failure_at_every_position_keeps_the_previous_checkpoint(backend_url, crash: bool) -> None:
    manager, model, provider = build(backend_url.url, backend_url.storage_options)
    provider.progress.step = provider.extra.step = 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1)
    manager.save_checkpoint(checkpoint_id=1)
    base = open_storage(backend_url.url, **backend_url.storage_options)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2)
    provider.progress.step = provider.extra.step = 2

    position = 0
    while True:
        faulty = FaultInjectingStorage(base, fail_after_ops=position, crash=crash)
        manager, _, _ = build(backend_url.url, backend_url.storage_options)
        manager.storage = faulty
        manager.model, manager.provider = model, provider
        try:
            manager.save_checkpoint(checkpoint_id=2)
        except (InjectedFault, CheckpointError, SimulatedCrash):
            done = faulty.log[:-1]  # the last operation logged is the one that failed
            committed = any(op.startswith(("write", "create")) and op.endswith("checkpoint_manifest.json") for op in done)
            expected = 2 if committed else 1
            latest = find_latest_checkpoint(base)
            assert latest is not None and latest.endswith(f"checkpoint-{expected}"), f"failure at op {position}"
            assert assert_latest_loads_completely(backend_url) == expected
            if not committed:
                position += 1
                continue
        break
    assert position > 10  # a save is many operations; each one failed once above
    assert assert_latest_loads_completely(backend_url) == 2
