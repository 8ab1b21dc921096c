"""Crash safety of ``ckptio cp``: SIGKILL the command at random moments while it copies between storages.

A child process runs the real command line (``python -m ckptio cp SRC DST``),
copying a committed checkpoint of several files (about 4 MiB) local->S3,
S3->GCS, GCS->local, and S3->S3 (same store: server-side copies). Each kill
lands a seeded random moment after the copy's in-progress marker appears at
the destination, within about one copy's duration (measured first). After
each kill:

* the destination is either not complete (``validate_checkpoint`` and
  ``find_latest_checkpoint`` refuse it) or complete and byte-identical to the
  source;
* the source is untouched: the same objects with the same bytes;
* a re-run (the next child resumes what was left; every few kills the command
  runs to the end) completes with a byte-identical copy.

With ``--overwrite`` onto a committed copy of another checkpoint (same file
names and sizes, other bytes), the destination is at every kill the old
checkpoint (complete, verifying), incomplete, or the new one: never a mix that
validates; a re-run then commits the new one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_figures import record

import ckptio
from ckptio import find_latest_checkpoint
from ckptio.checkpoint import (
    IN_PROGRESS_NAME,
    validate_checkpoint,
    verify_checkpoint,
)
from ckptio.checkpoint.copy import copy_checkpoint
from ckptio.cli import main
from ckptio.storage import Storage, open_storage

ROUTES = [("local", "s3"), ("s3", "gcs"), ("gcs", "local"), ("s3", "s3")]
ROUTE_IDS = [f"{a}->{b}" for a, b in ROUTES]
KILLS = 5
OVERWRITE_KILLS = 4
#: Every this many kills, the command runs again to the end (the others leave the next child to resume).
RERUN_EVERY = 2
#: A child whose copy has not begun (no marker at the destination) by then fails the test.
START_TIMEOUT = 90.0


class _Where:
    """Fresh URLs on each backend, and their removal at the end."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request, self.tmp_path, self.made = request, tmp_path, []

    def url(self, backend: str, name: str) -> tuple[str, dict[str, Any]]:
        if backend == "local":
            return str(self.tmp_path / name), {}
        server = self.request.getfixturevalue("s3_server" if backend == "s3" else "gcs_server")
        scheme = "s3" if backend == "s3" else "gs"
        url = f"{scheme}://{server.bucket}/{uuid.uuid4().hex}/{name}"
        self.made.append((url, server.storage_options))
        return url, dict(server.storage_options)

    def remove(self) -> None:
        import fsspec

        for url, options in self.made:
            fs, path = fsspec.core.url_to_fs(url, **options)
            fs.invalidate_cache(path)
            if fs.exists(path):
                fs.rm(path, recursive=True)


@pytest.fixture
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Where]:
    made = _Where(request, tmp_path)
    yield made
    made.remove()


def _save(url: str, options: dict[str, Any], *, shift: float = 0.0) -> str:
    """A committed checkpoint of four 512x512 layers (about 4 MiB, a shard per weight, an index, a manifest)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    cfg = ckptio.CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=1_100_000)
    return ckptio.CheckpointManager(cfg, None, model=model).save_checkpoint()


def _contents(storage: Storage) -> dict[str, bytes]:
    return {key: storage.read_bytes(key) for key in sorted(storage.walk(""))}


def _committed_contents(storage: Storage) -> dict[str, bytes]:
    """What a complete checkpoint holds: a copy marker next to its manifest (a copy killed between
    its commit and the marker's removal, or an overwrite that has not uncommitted it yet) is not content."""
    return {key: data for key, data in _contents(storage).items() if key != IN_PROGRESS_NAME}


def _argv(src: str, src_options: dict[str, Any], dst: str, dst_options: dict[str, Any], *extra: str) -> list[str]:
    """Arguments of ``ckptio cp``; the options of each end as JSON (``{}`` for local disk)."""
    argv = ["cp", src, dst, "--no-progress", "--dst-storage-options", json.dumps(dst_options), *extra]
    return argv + (["--storage-options", json.dumps(src_options)] if src_options else [])


def _run_and_kill(argv: list[str], dst: Storage, delay: float | None) -> float:
    """Run ``ckptio cp`` in a child; once the copy's marker is at ``dst``, wait ``delay`` seconds and SIGKILL it
    (``delay`` None: let it finish and return the seconds from the marker seen to the marker gone: the copy)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with subprocess.Popen([sys.executable, "-m", "ckptio", *argv], env=env, stdout=subprocess.DEVNULL) as child:
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not dst.is_file(IN_PROGRESS_NAME):
                assert child.poll() is None or delay is None, f"the copy ended before a kill (rc {child.returncode})"
                if child.poll() is not None:
                    return 0.0
                assert time.monotonic() < deadline, f"no copy marker at {dst.url} within {START_TIMEOUT}s"
                time.sleep(0.005)
            seen = time.monotonic()
            if delay is not None:
                time.sleep(delay)
                return delay
            while dst.is_file(IN_PROGRESS_NAME):  # the commit removes it
                assert time.monotonic() - seen < 300, "the copy did not finish within 300 s"
                time.sleep(0.005)
            copying = time.monotonic() - seen
            assert child.wait(timeout=300) == 0
            return copying
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)


def _is_complete(dst: Storage, dst_url: str, dst_options: dict[str, Any]) -> bool:
    """Whether the destination validates; the discovery of the latest checkpoint under it must agree."""
    complete = validate_checkpoint(dst)
    # a run directory whose checkpoints/ holds the copy: discovery takes it only when it is complete
    found = find_latest_checkpoint(dst_url.rsplit("/checkpoints/", 1)[0], storage_options=dst_options)
    assert (found is not None and found.rstrip("/").endswith(dst_url.rsplit("/", 1)[1])) == complete, (found, complete)
    return complete


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize(("src_backend", "dst_backend"), ROUTES, ids=ROUTE_IDS)
def test_sigkill_during_cp_leaves_nothing_half_copied(where: _Where, src_backend: str, dst_backend: str) -> None:
    rng = random.Random(f"cp {src_backend} {dst_backend}")
    run_url, src_options = where.url(src_backend, "run")
    source_url = _save(run_url, src_options)
    source = open_storage(source_url, **src_options)
    before = _contents(source)
    assert len(before) >= 6 and sum(map(len, before.values())) > 4 * 2**20, sorted(before)
    dst_run, dst_options = where.url(dst_backend, "copy")
    dst_url = f"{dst_run}/checkpoints/checkpoint-1"
    dst = open_storage(dst_url, **dst_options)
    argv = _argv(source_url, src_options, dst_url, dst_options)

    duration = _run_and_kill(argv, dst, None)  # one whole copy, to aim the kills within one
    assert _contents(dst) == before
    dst.delete_prefix("")
    outcomes = []
    for kill in range(KILLS):
        # The first kill lands as soon as the marker is seen: a server-side copy may take only 0.1 s.
        _run_and_kill(argv, dst, 0.0 if kill == 0 else rng.uniform(0.0, 1.1 * duration))
        assert _contents(source) == before, f"kill {kill}: the source changed"
        if _is_complete(dst, dst_url, dst_options):
            outcomes.append("complete")
            assert _committed_contents(dst) == before, f"kill {kill}: a complete copy differs from the source"
            assert verify_checkpoint(dst) == []
            dst.delete_prefix("")  # the next child starts over
            continue
        outcomes.append("incomplete")
        if kill % RERUN_EVERY == RERUN_EVERY - 1:  # else the next child resumes what this one left
            assert main(argv) == 0
            assert _contents(dst) == before, f"kill {kill}: the re-run's copy differs from the source"
            dst.delete_prefix("")
    assert "incomplete" in outcomes, f"no kill landed inside a copy ({duration:.2f} s): {outcomes}"
    # whatever the last kill left, a re-run completes it
    assert main(argv) == 0
    assert _contents(dst) == before and verify_checkpoint(dst) == [] and _is_complete(dst, dst_url, dst_options)
    assert _contents(source) == before
    record("sigkill during cp", route=f"{src_backend}->{dst_backend}", crashes=KILLS,
           kills_before_commit=outcomes.count("incomplete"), data_lost=0)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize(("src_backend", "dst_backend"), ROUTES, ids=ROUTE_IDS)
def test_sigkill_during_cp_overwrite_keeps_the_old_copy_until_the_new_commits(
    where: _Where, src_backend: str, dst_backend: str
) -> None:
    rng = random.Random(f"cp --overwrite {src_backend} {dst_backend}")
    old_url, src_options = where.url(src_backend, "old")
    new_url, _ = where.url(src_backend, "new")
    old_src = open_storage(_save(old_url, src_options), **src_options)
    new_src = open_storage(_save(new_url, src_options, shift=1.0), **src_options)
    old, new = _contents(old_src), _contents(new_src)
    assert {k: len(v) for k, v in old.items()} == {k: len(v) for k, v in new.items()} and old != new
    dst_run, dst_options = where.url(dst_backend, "copy")
    dst_url = f"{dst_run}/checkpoints/checkpoint-1"
    dst = open_storage(dst_url, **dst_options)
    argv = _argv(new_src.url, src_options, dst_url, dst_options, "--overwrite")

    def state() -> str:
        if not _is_complete(dst, dst_url, dst_options):
            return "incomplete"
        assert verify_checkpoint(dst) == [], "a destination that validates holds mixed content"
        found = _committed_contents(dst)
        assert found in (old, new), "a complete destination that is neither the old nor the new checkpoint"
        return "old" if found == old else "new"

    copy_checkpoint(old_src, dst)
    duration = _run_and_kill(argv, dst, None)
    assert state() == "new"
    states = []
    for kill in range(OVERWRITE_KILLS):
        copy_checkpoint(old_src, dst, overwrite=True)
        assert state() == "old"
        _run_and_kill(argv, dst, 0.0 if kill == 0 else rng.uniform(0.0, 1.1 * duration))
        states.append(state())
        assert _contents(old_src) == old and _contents(new_src) == new, f"kill {kill}: a source changed"
    assert set(states) - {"new"}, f"no kill landed before the commit ({duration:.2f} s): {states}"
    # a re-run completes the new copy from whatever the last kill left
    assert main(argv) == 0
    assert state() == "new" and _contents(dst) == new
    record("sigkill during cp --overwrite", route=f"{src_backend}->{dst_backend}", crashes=OVERWRITE_KILLS,
           kills_before_commit=len(states) - states.count("new"), data_lost=0)
