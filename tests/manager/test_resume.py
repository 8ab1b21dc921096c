"""Exact resume: 12 steps in one go equal 7 steps, a save, and a new process resuming to 12."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from ckptio.demo import DemoTrainer

STEPS, SAVED_AT = 12, 7


def run_demo_worker(backend_url, *extra: str) -> tuple[int, dict[int, float], str]:
    argv = [
        sys.executable, "-m", "ckptio.demo", "--worker",
        "--output", backend_url.url,
        "--storage-options", json.dumps(backend_url.storage_options),
        "--steps", str(STEPS), "--save-every", str(SAVED_AT), "--interrupt-at", str(SAVED_AT),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    losses = {}
    for line in proc.stdout.splitlines():
        if line.startswith("LOSS "):
            _, step, value = line.split()
            losses[int(step)] = float.fromhex(value)
    return proc.returncode, losses, proc.stderr


def test_resumed_losses_are_bit_identical(backend_url) -> None:
    if backend_url.name == "memory":
        pytest.skip("memory:// does not outlive the process; resume needs a new process")
    trainer = DemoTrainer(STEPS)
    reference = {step: trainer.train_step() for step in range(1, STEPS + 1)}

    code, first, err = run_demo_worker(backend_url)
    assert code == -signal.SIGKILL, err  # killed right after the save at step 7
    assert sorted(first) == list(range(1, SAVED_AT + 1))

    code, resumed, err = run_demo_worker(backend_url, "--resume")
    assert code == 0, err
    assert sorted(resumed) == list(range(SAVED_AT + 1, STEPS + 1))
    assert {s: reference[s] for s in resumed} == resumed  # exact float equality
    assert first == {s: reference[s] for s in first}
