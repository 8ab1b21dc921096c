"""Asynchronous saves across gloo ranks: snapshots bit for bit while DDP keeps training, and background
failures that reach every rank.

Spawned ranks (hard timeouts), on local disk and S3 (``memory://`` is private
to each process; GCS is covered by the single-process async tests).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from async_rank_workers import (
    fail_in_background,
    from_bytes,
    load_in_fresh_process,
    save_while_training,
)
from manager_helpers import same_state

from ckptio.checkpoint import read_manifest, verify_checkpoint
from ckptio.storage import open_storage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "state"))
from state_spawn import run_ranks, simulated_nodes_env

TIMEOUT = 300
SAVES = 3
KEEP = 2
MANIFEST = "checkpoint_manifest.json"
BACKENDS = pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)


def _env(world_size: int) -> list[dict[str, str]]:
    """Two simulated nodes at world size 4 (so PER_NODE has two writers), one node at 2."""
    return simulated_nodes_env(world_size, 2)


def _mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    assert a.keys() == b.keys()
    return sorted(k for k in a if not same_state(a[k], b[k]))


@BACKENDS
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_saves_asynchronously_while_training_and_resumes_bit_for_bit(
    backend_url: Any, world_size: int
) -> None:
    url, options = backend_url.url, backend_url.storage_options
    env = _env(world_size)
    saved = run_ranks(save_while_training, world_size, url, options, SAVES, KEEP, env=env, timeout=TIMEOUT)

    paths = saved[0]["paths"]
    assert [p.rsplit("-", 1)[1] for p in paths] == [str(i) for i in range(1, SAVES + 1)]
    for rank, result in enumerate(saved):
        assert result["paths"] == paths, rank
        # every save was still in flight while the loop trained (and ran its collectives) and changed
        # every piece of state it holds
        assert result["pending_during_steps"] == [True] * SAVES, rank
        for keys in result["mutated_keys"]:
            assert keys == ["model", "noise", "optimizer", "progress", "rng", "scheduler", "table"], (rank, keys)
        assert result["collectives"] == SAVES * 7, rank
        assert result["latest"] == paths[-1], rank
        assert result["complete"] == [f"checkpoint-{i}" for i in range(SAVES - KEEP + 1, SAVES + 1)], rank
    # rank 0 wrote the marker of every save only once the loop had opened the gate
    assert saved[0]["held_writes"] == SAVES

    # The committed checkpoints are whole: every file of the manifest has its size and CRC32C, every rank
    # wrote its own per-rank file, and each node its per-node file.
    for path in paths[-KEEP:]:
        assert verify_checkpoint(path, storage_options=options) == []
        manifest = read_manifest(open_storage(path, **options))
        assert manifest is not None and manifest.world_size == world_size
        components = {c.key: (c.ranks, c.files) for c in manifest.components.values()}
        assert components["noise"] == (list(range(world_size)),
                                       [f"noise_state_rank_{r}.pt" for r in range(world_size)])
        assert components["optimizer"] == ([0], ["optimizer_state.pt"])
        nodes = world_size // 2
        assert components["table"][1] == [f"table_state_node_{n}.pt" for n in range(nodes)]

    # In fresh processes every rank loads the latest checkpoint: its values at save time, bit for bit,
    # not the ones it trained on afterwards; the previous checkpoint by name likewise.
    expected = [r["expected"][-1] for r in saved]
    loaded = run_ranks(load_in_fresh_process, world_size, url, options, expected, Path(paths[-2]).name,
                       env=env, timeout=TIMEOUT)
    for rank, result in enumerate(loaded):
        want = from_bytes(expected[rank])
        final = from_bytes(saved[rank]["final"])
        assert _mismatches(want, final) != [], rank  # the loop changed its state after the last save
        assert "model" in result["differed_before"] and "optimizer" in result["differed_before"], rank
        assert result["loaded_path"] == f"checkpoints/checkpoint-{SAVES}", rank
        got = from_bytes(result["loaded"])
        assert _mismatches(got, want) == [], rank
        assert got["tied"] is True
        previous = from_bytes(result["previous"])
        assert _mismatches(previous, from_bytes(saved[rank]["expected"][-2])) == [], rank
        assert _mismatches(previous, got) != [], rank


@BACKENDS
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    ("failing", "fail_after_ops", "next_call"),
    [("last", 5, "wait"), ("first", 3, "save")],
    ids=["last-rank-fails-then-wait", "rank-0-fails-then-save"],
)
def test_a_background_failure_on_one_rank_surfaces_on_every_rank_at_its_next_call(
    backend_url: Any, world_size: int, failing: str, fail_after_ops: int, next_call: str
) -> None:
    url, options = backend_url.url, backend_url.storage_options
    failing_rank = world_size - 1 if failing == "last" else 0
    results = run_ranks(fail_in_background, world_size, url, options, failing_rank, fail_after_ops, next_call,
                        env=_env(world_size), timeout=TIMEOUT)
    failed = results[0]["failed"]
    assert failed.endswith("checkpoint-2")
    assert results[failing_rank]["tripped"] is True
    log = results[failing_rank]["fault_log"]
    assert len(log) == fail_after_ops + 1, log  # the last operation logged is the one that failed
    for rank, result in enumerate(results):
        assert result["failed"] == failed, rank
        assert result["error"] == "InjectedFault", (rank, result)
        assert "CkptioError" in result["bases"], (rank, result)
        assert failed in result["message"], (rank, result)
        assert f"rank {failing_rank} failed" in result["message"], (rank, result)
        assert result["latest"] == result["first"], (rank, result)
        assert result["complete"] == ["checkpoint-1"], (rank, result)
        assert result["first_mismatches"] == [], (rank, result)
        # after the error was raised once, a healthy manager commits again
        assert result["latest_after"] == result["recovered"] != failed, (rank, result)
    second = open_storage(failed, **options)
    assert MANIFEST not in set(second.list("")), "the failed save must not be committed"


# A script that ends the way torchrun scripts do: ``dist.destroy_process_group()`` right after the last
# ``save_checkpoint()``, with no ``wait_until_finished()``; interpreter exit then waits for the save.
# The gate holds rank 0's background save at its first write until the group is gone.
_DESTROY_WHILE_PENDING = """
import datetime, logging, sys
import torch, torch.distributed as dist
from async_rank_workers import GatedStorage, RankNoise
from ckptio import CheckpointConfig, CheckpointManager, SharingPattern, StateComponent
from ckptio.storage import open_storage

class Provider:
    def __init__(self, rank):
        self.noise = RankNoise(rank)
    def get_state_components(self):
        return [StateComponent("noise", self.noise, SharingPattern.PER_RANK)]
    def get_process_groups(self):
        return {}

rank, port, url = int(sys.argv[1]), sys.argv[2], sys.argv[3]
logging.basicConfig(level=logging.ERROR)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=20))
storage = GatedStorage(open_storage(url))
manager = CheckpointManager(CheckpointConfig(output_dir=url, async_save=True), Provider(rank), storage=storage)
storage.gate.close()
manager.save_checkpoint()
dist.destroy_process_group()
storage.gate.open()
"""


def test_destroying_the_process_group_while_a_save_is_pending_never_commits_a_partial_checkpoint(
    tmp_path: Path,
) -> None:
    import os
    import subprocess

    from state_spawn import free_port

    from ckptio import find_latest_checkpoint

    url = str(tmp_path / "run")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).parent)}
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", _DESTROY_WHILE_PENDING, str(rank), port, url], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for rank in range(2)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    latest = find_latest_checkpoint(url)
    if latest is None:
        return  # not committed: acceptable
    manifest = read_manifest(open_storage(latest))
    assert manifest is not None
    assert manifest.components["noise"].ranks == [0, 1], (latest, manifest.components["noise"])
