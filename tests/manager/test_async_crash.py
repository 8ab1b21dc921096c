"""Crash safety of asynchronous saves: SIGKILL at random moments while saves are written in the background.

The child (``crash_child.py --async``) resumes from the latest checkpoint and
then saves in a loop; checkpoint N holds N everywhere, and right after each
save returns the child overwrites every value with -N while the background
thread is still writing. Every other child writes to slow storage, so that
kills land inside saves (the marker written, the manifest not yet) often. After each kill the latest complete checkpoint must
load completely and hold its own step's values (never -N, never a mix), and
discovery must never pick an incomplete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from crash_child import build

from ckptio import find_latest_checkpoint, validate_checkpoint, verify_checkpoint
from ckptio.checkpoint import list_checkpoints

CHILD = str(Path(__file__).with_name("crash_child.py"))
KILLS = 10
#: Every other child writes to slow storage (each write waits this long first), so that most of its
#: time is spent inside a save and the kill lands in the middle of one.
WRITE_DELAY = 0.02
#: A child that has not resumed by then fails the test instead of hanging it.
READY_TIMEOUT = 90.0


def _ready_line(child: subprocess.Popen[str]) -> str:
    """The child's first line, within READY_TIMEOUT seconds."""
    assert child.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=READY_TIMEOUT):
            child.kill()
            raise AssertionError(f"the child did not resume within {READY_TIMEOUT}s")
    return child.stdout.readline()


def _latest_loads_completely(backend_url, latest: str) -> int:
    """Load the latest checkpoint into fresh objects; every value must be its own step's."""
    manager, model, provider = build(backend_url.url, backend_url.storage_options)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # neither a step nor its negation: a missing tensor shows
    manager.load_checkpoint(None)
    step = provider.progress.step
    assert step > 0, f"{latest} holds the values written after its save returned ({step})"
    assert latest.endswith(f"checkpoint-{step}"), (latest, step)
    assert provider.extra.step == step, (latest, provider.extra.step)
    for name, p in model.named_parameters():
        assert torch.all(p == step), f"{latest}: {name} holds {p.unique()[:4].tolist()}, not {step}"
    return step


@pytest.mark.slow
@pytest.mark.parametrize("keep", [None, 3], ids=["keep-all", "rotate-to-3"])
@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_sigkill_during_async_saves_never_loses_a_checkpoint(backend_url, keep: int | None) -> None:
    url, options = backend_url.url, backend_url.storage_options
    rng = random.Random(20261125 + (keep or 0))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(CHILD).parent)}
    argv = [sys.executable, CHILD, url, json.dumps(options), "--async"]
    if keep is not None:
        argv.append(f"--keep={keep}")  # rotation runs in the background too, and is killed as well
    seen: set[str] = set()
    steps: list[int] = []
    resumed: list[int] = []
    left_incomplete = 0
    for kill in range(KILLS):
        slow = [f"--write-delay={WRITE_DELAY}"] if kill % 2 else []
        with subprocess.Popen(argv + slow, stdout=subprocess.PIPE, text=True, env=env) as child:
            try:
                line = _ready_line(child)
                assert line.startswith("READY"), line
                resumed.append(int(line.split()[1]))
                time.sleep(rng.uniform(0.02, 1.0))
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
        entries = list_checkpoints(url, storage_options=options)
        complete = {e.name for e in entries if e.is_complete}
        if keep is None:
            assert seen <= complete, f"complete checkpoints disappeared: {sorted(seen - complete)}"
        else:  # at most one past the limit: killed between a commit and its rotation
            assert len(complete) <= keep + 1, sorted(complete)
        seen = complete
        latest = find_latest_checkpoint(url, storage_options=options)
        assert latest is not None, f"kill {kill}: no checkpoint at all"
        name = Path(latest).name
        assert name in complete, f"kill {kill}: discovery took {name}, which is not complete"
        newest_complete = max(complete, key=lambda n: int(n.rsplit("-", 1)[1]))
        assert name == newest_complete, (name, newest_complete)
        assert validate_checkpoint(latest, storage_options=options)
        # every checkpoint that looks complete is whole (rotation removes the manifest first)
        for entry in entries:
            if entry.is_complete and (keep is not None or entry.name == name):
                assert verify_checkpoint(entry.url, storage_options=options) == [], entry.name
        newer = [e for e in entries if e.checkpoint_id is not None and e.checkpoint_id > int(name.rsplit("-", 1)[1])]
        assert all(not e.is_complete for e in newer), newer
        left_incomplete += bool(newer)
        steps.append(_latest_loads_completely(backend_url, latest))
    # each child resumed from what the previous one left, and the children made progress
    assert resumed == [0, *steps[:-1]], (resumed, steps)
    assert steps == sorted(steps) and steps[-1] >= KILLS, steps
    # the kills landed while a save was being written at least once (its leftovers were ignored)
    assert left_incomplete > 0, steps
