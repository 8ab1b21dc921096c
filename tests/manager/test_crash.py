"""Crash safety: SIGKILL at random moments, and a failure at every position of a save."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from crash_child import build
from reliability_figures import record

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
#: A child that prints nothing for this long fails the test instead of hanging it.
LINE_TIMEOUT = 90.0


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


def _lines(child: subprocess.Popen[str]) -> Callable[[], str]:
    """The child's next line, within LINE_TIMEOUT seconds (a reader thread feeds a queue)."""
    lines: queue.Queue[str] = queue.Queue()
    assert child.stdout is not None
    stdout = child.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=LINE_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"the child printed nothing for {LINE_TIMEOUT}s") from None

    return next_line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_never_loses_a_checkpoint(backend_url) -> None:
    """Each child resumes, saves once or twice (``SAVED`` lines; they time a save), and is killed at a
    random moment within its next save. Runs on local disk, S3 and GCS (memory:// dies with its process)."""
    if backend_url.name == "memory":
        pytest.skip("memory:// lives in the process that is killed")
    rng = random.Random(20261124)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(CHILD).parent)}
    argv = [sys.executable, CHILD, backend_url.url, json.dumps(backend_url.storage_options), "--report"]
    seen: set[str] = set()
    steps = []
    inside = 0  # kills that landed between a save's marker and its commit
    for kill in range(KILLS):
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) as child:
            try:
                next_line = _lines(child)
                assert next_line().startswith("READY")
                times = []
                for _ in range(rng.choice([1, 2])):
                    assert next_line().startswith("SAVED")
                    times.append(time.monotonic())
                if len(times) == 1:
                    assert next_line().startswith("SAVED")
                    times.append(time.monotonic())
                time.sleep(rng.uniform(0.0, times[-1] - times[-2]))  # somewhere in the save now running
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
        entries = list_checkpoints(backend_url.url, storage_options=backend_url.storage_options)
        now = {e.name for e in entries if e.is_complete}
        assert seen <= now, f"complete checkpoints disappeared: {sorted(seen - now)}"
        seen = now
        step = assert_latest_loads_completely(backend_url)
        newer = [e for e in entries if e.checkpoint_id is not None and e.checkpoint_id > step]
        assert all(not e.is_complete for e in newer), (kill, newer)
        inside += bool(newer)
        steps.append(step)
    assert steps == sorted(steps) and steps[-1] >= KILLS  # progress was made between kills
    assert inside >= KILLS // 3, f"only {inside} of {KILLS} kills landed inside a save"
    record("sigkill during save", backend=backend_url.name, crashes=KILLS, kills_inside_a_save=inside, data_lost=0)


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
