"""Crash safety of rotation: SIGKILL while ``save_total_limit`` deletes old checkpoints.

The child (``crash_child.py --keep=2``) resumes from the latest checkpoint and
saves in a loop, so every save rotates. Each child is told to stop at one
operation of one checkpoint deletion (``--stop-in-delete=D:K:MODE``): it prints
``STOPPED`` there and either waits to be killed exactly before that operation
(``pause``: every position of a deletion in turn, from the delete marker to
past the last delete) or carries on and is killed a random moment later
(``go``). After each kill:

* the newest ``keep`` committed checkpoints are all still complete (rotation
  only ever deletes what it should), at most ``keep + 1`` are complete once a
  rotation got through (killed between a commit and its rotation), and the
  latest loads bit-exact;
* nothing half-deleted passes for complete: every checkpoint discovery calls
  complete verifies byte for byte, every other one fails validation, and
  ``find_latest_checkpoint`` picks the newest complete one;
* the leftovers of the previous kill are gone once the next child has
  rotated once; a last, uninterrupted save leaves exactly ``keep`` checkpoints.
"""

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
from pathlib import Path

import pytest
import torch
from crash_child import build
from reliability_figures import record

from ckptio import find_latest_checkpoint, validate_checkpoint, verify_checkpoint
from ckptio.checkpoint import list_checkpoints
from ckptio.checkpoint.layout import CHECKPOINTS_DIR
from ckptio.storage import open_storage

CHILD = str(Path(__file__).with_name("crash_child.py"))
KEEP = 2
KILLS = 8
#: Operations into a deletion at which a paused child is killed: 0 is the delete marker write;
#: the later ones reach past the last operation of one deletion (into the next one, or the next save).
POSITIONS = range(6)
#: A child that prints nothing for this long fails the test instead of hanging it.
LINE_TIMEOUT = 90.0


def _number(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


class _Lines:
    """The child's stdout, line by line, with a timeout (a reader thread feeds a queue)."""

    def __init__(self, child: subprocess.Popen[str]) -> None:
        self.child = child
        self.lines: queue.Queue[str] = queue.Queue()
        assert child.stdout is not None
        stdout = child.stdout
        threading.Thread(target=lambda: [self.lines.put(line) for line in stdout], daemon=True).start()

    def next(self) -> str:
        try:
            return self.lines.get(timeout=LINE_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"the child printed nothing for {LINE_TIMEOUT}s") from None


def _latest_loads_bit_exact(backend_url, latest: str) -> int:
    """Load the latest checkpoint into fresh objects; every value must be its own step's."""
    manager, model, provider = build(backend_url.url, backend_url.storage_options)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # no step's value: a tensor left unloaded shows
    manager.load_checkpoint(None)
    step = provider.progress.step
    assert latest.rstrip("/").endswith(f"checkpoint-{step}"), (latest, step)
    assert provider.extra.step == step
    for name, p in model.named_parameters():
        assert torch.equal(p, torch.full_like(p, step)), f"{latest}: {name} is not all {step}"
    return step


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("backend_url", ["local", "s3", "gcs"], indirect=True)
def test_sigkill_during_rotation_never_loses_a_kept_checkpoint(backend_url) -> None:
    url, options = backend_url.url, backend_url.storage_options
    rng = random.Random(20261130)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(CHILD).parent)}
    argv = [sys.executable, CHILD, url, json.dumps(options), f"--keep={KEEP}", "--report"]
    committed: set[int] = set()  # every checkpoint known to have been committed
    incomplete_before: set[str] = set()
    complete_before = 0
    steps: list[int] = []
    stopped_in: list[tuple[str, int, str]] = []
    for kill in range(KILLS):
        position = POSITIONS[kill % len(POSITIONS)]
        mode = "pause" if kill < len(POSITIONS) else "go"
        deletion = rng.choice([1, 2, 3, 4])  # past the first save's deletions: a rotation gets through first
        stop = f"--stop-in-delete={deletion}:{position}:{mode}"
        saved: list[int] = []
        with subprocess.Popen([*argv, stop], stdout=subprocess.PIPE, text=True, env=env) as child:
            try:
                lines = _Lines(child)
                ready = lines.next()
                assert ready.startswith("READY"), ready
                while not (line := lines.next()).startswith("STOPPED"):
                    assert line.startswith("SAVED"), line
                    saved.append(int(line.split()[1]))
                _, deleting, _, last_commit, *op = line.split()
                if mode == "go":
                    time.sleep(rng.uniform(0.0, 0.05))
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
        stopped_in.append((deleting, position, " ".join(op)))
        committed |= set(saved) | ({_number(last_commit)} if last_commit != "-" else set())

        entries = list_checkpoints(url, storage_options=options)
        complete = {e.name for e in entries if e.is_complete}
        numbers = {_number(n) for n in complete}
        latest = find_latest_checkpoint(url, storage_options=options)
        assert latest is not None, f"kill {kill}: no checkpoint at all"
        newest = max(numbers)
        assert latest.rstrip("/").endswith(f"checkpoint-{newest}"), (kill, latest, sorted(complete))
        assert newest >= max(committed), f"kill {kill}: checkpoint-{max(committed)} was committed, latest is {latest}"
        if mode == "pause":  # stopped before an operation: the last commit is exactly what is newest
            assert newest == max(committed), (kill, newest, sorted(committed))
        # A child killed a moment after its stop point ("go") may have committed more than it reported.
        committed |= numbers
        must_keep = sorted(committed)[-KEEP:]
        assert set(must_keep) <= numbers, f"kill {kill} {stopped_in[-1]}: {must_keep} must be kept, got {sorted(numbers)}"
        assert deleting not in {f"checkpoint-{n}" for n in must_keep}, (kill, deleting, must_keep)
        # each save adds one and its rotation, once through, leaves KEEP: one past the limit when killed
        # in the rotation after an uninterrupted one, else one more than the previous kill left at most
        assert len(complete) <= (KEEP if saved else max(KEEP, complete_before)) + 1, (kill, sorted(complete))
        complete_before = len(complete)
        # nothing half-deleted passes for complete, and what does is whole
        for entry in entries:
            if entry.is_complete:
                assert verify_checkpoint(entry.url, storage_options=options) == [], (kill, entry.name)
            else:
                assert not validate_checkpoint(entry.url, storage_options=options), (kill, entry.name)
        incomplete = {e.name for e in entries if not e.is_complete}
        if saved:  # a save of this child committed and rotated uninterrupted: the previous kill's leftovers went
            left = (incomplete_before & {e.name for e in entries}) - {deleting}
            assert not left, f"kill {kill}: leftovers of the previous kill remain after a rotation: {sorted(left)}"
        incomplete_before = incomplete
        steps.append(_latest_loads_bit_exact(backend_url, latest))

    assert steps == sorted(steps) and steps[-1] > KILLS, steps
    # a last, uninterrupted save rotates every leftover away
    manager, model, provider = build(url, options, keep=KEEP)
    manager.load_checkpoint(None)
    step = provider.progress.step + 1
    provider.progress.step = provider.extra.step = step
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    manager.save_checkpoint(checkpoint_id=step)
    left = {key.split("/", 1)[0] for key in open_storage(url, **options).child(CHECKPOINTS_DIR).walk("")}
    assert left == {f"checkpoint-{step - 1}", f"checkpoint-{step}"}  # not one object of a leftover remains
    assert all(e.is_complete for e in list_checkpoints(url, storage_options=options))
    assert _latest_loads_bit_exact(backend_url, find_latest_checkpoint(url, storage_options=options) or "") == step
    record("sigkill during rotation", backend=backend_url.name, crashes=KILLS, data_lost=0)
