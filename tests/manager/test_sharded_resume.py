"""Resuming an FSDP2 (DTensor) training run from the manager's sharded checkpoints.

* same world size, new processes: the losses after the resume are bit for bit those of a
  run that was never interrupted (local disk at 2 and 4 ranks, S3 at 2);
* another world size (4 -> 2, 4 -> 1, 2 -> 4): gathered parameters and optimizer moments
  are those saved, bit for bit;
* a rank whose shard write fails raises, and so do the others, the same ckptio error;
  a rank killed while writing its shards: the others raise a ckptio error; either way
  the previous checkpoint stays the latest;
* a truncated shard file of a committed checkpoint: every rank refuses the load, naming
  the file, and nothing is loaded; a corrupt one (same size) fails its load with a ckptio
  error naming it on every rank.

Spawns are shared: two save runs (2 and 4 ranks) and three resume runs (2, 4 and 1 rank),
each resume run playing several scenarios, feed most tests through module fixtures.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "state"))

from sharded_resume_workers import (
    SAVE_AFTER,
    TOTAL_STEPS,
    rank_fails_mid_sharded_save,
    resume_scenarios,
    train_and_save,
)
from sharded_workers import unpack
from state_spawn import run_ranks
from test_sharded_manager import _differing

from ckptio import find_latest_checkpoint
from ckptio.checkpoint import list_checkpoints, read_manifest
from ckptio.storage import open_storage

pytestmark = pytest.mark.timeout(600)

SPAWN_TIMEOUT = 300
VICTIM = "rank00001-part000.distcp"


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Nested dicts and lists flattened to ``{"/a/b/0": leaf}``."""
    if isinstance(value, dict):
        return {p: v for k, item in value.items() for p, v in _leaves(item, f"{path}/{k}").items()}
    if isinstance(value, list):
        return {p: v for i, item in enumerate(value) for p, v in _leaves(item, f"{path}/{i}").items()}
    return {path: value}


def _tensors_all_differ(before: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Model parameters and optimizer moments (and step) that are equal before the load: should be none."""
    old, new = _leaves({k: before[k] for k in ("model", "optim")}), _leaves({k: saved[k] for k in ("model", "optim")})
    tensors = [p for p, v in new.items() if isinstance(v, torch.Tensor)]
    assert any("/exp_avg_sq" in p for p in tensors) and any(p.endswith("/step") for p in tensors), tensors
    return [p for p in tensors if p in old and not _differing(old[p], new[p])]


def _ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result["error"]
    return result


@pytest.fixture(scope="module")
def s3_run(s3_server: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh S3 prefix for the module's run, removed afterwards."""
    import fsspec

    url = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}/run"
    yield url, s3_server.storage_options
    fs, path = fsspec.core.url_to_fs(url.rsplit("/", 1)[0], **s3_server.storage_options)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, s3_run: tuple[str, dict[str, Any]]) -> dict[Any, Any]:
    """Reference runs and checkpoints: 2 ranks (local disk and S3) and 4 ranks (local disk)."""
    root = tmp_path_factory.mktemp("sharded_resume")
    s3_url, s3_options = s3_run
    two = run_ranks(train_and_save, 2, [(str(root / "two"), None), (s3_url, s3_options)], timeout=SPAWN_TIMEOUT)
    four = run_ranks(train_and_save, 4, [(str(root / "four"), None)], timeout=SPAWN_TIMEOUT)
    return {"root": root, "s3": s3_run, 2: two, 4: four}


@pytest.fixture(scope="module")
def resumed(saved: dict[Any, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every resume scenario's result per rank, keyed by scenario name (three spawns: 2, 4 and 1 rank)."""
    root: Path = saved["root"]
    two, four = str(root / "two"), str(root / "four")
    s3_url, s3_options = saved["s3"]
    damaged = root / "damaged"
    shutil.copytree(two, damaged)
    checkpoint = damaged / "checkpoints" / "checkpoint-1"
    victim = checkpoint / VICTIM
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # committed, then cut short
    corrupt = root / "corrupt"
    shutil.copytree(two, corrupt)
    flipped = corrupt / "checkpoints" / "checkpoint-1" / VICTIM
    flipped.write_bytes(bytes(b ^ 0xFF if i % 7 == 0 else b for i, b in enumerate(flipped.read_bytes())))

    plans: dict[int, list[tuple[str, dict[str, Any]]]] = {
        2: [
            ("exact-local-2", {"kind": "exact", "url": two}),
            ("exact-s3-2", {"kind": "exact", "url": s3_url, "options": s3_options}),
            ("reshard-4-to-2", {"kind": "reshard", "url": four}),
            ("truncated", {"kind": "refused", "url": str(damaged), "checkpoint": str(checkpoint)}),
            ("corrupt", {"kind": "refused", "url": str(corrupt), "checkpoint": str(flipped.parent)}),
        ],
        4: [
            ("exact-local-4", {"kind": "exact", "url": four}),
            ("reshard-2-to-4", {"kind": "reshard", "url": two}),
        ],
        1: [
            ("reshard-4-to-1-unsharded", {"kind": "reshard", "url": four}),
            ("reshard-4-to-1-mesh-of-one", {"kind": "reshard", "url": four, "mesh_of_one": True}),
        ],
    }
    results: dict[str, list[dict[str, Any]]] = {"victim": [{"url": str(victim)}], "flipped": [{"url": str(flipped)}]}
    for world_size, plan in plans.items():
        per_rank = run_ranks(resume_scenarios, world_size, [s for _, s in plan], timeout=SPAWN_TIMEOUT)
        for i, (name, _) in enumerate(plan):
            results[name] = [rank_results[i] for rank_results in per_rank]
    return results


def test_sharded_checkpoints_hold_every_rank_shards(saved: dict[Any, Any]) -> None:
    """The checkpoints the other tests resume from are sharded ones, written by every rank."""
    for world_size, paths in ((2, saved[2][0]["paths"]), (4, saved[4][0]["paths"])):
        for path in paths:
            options = saved["s3"][1] if path.startswith("s3://") else {}
            manifest = read_manifest(open_storage(path, **options))
            assert manifest is not None and manifest.world_size == world_size
            assert manifest.metadata["sharded_state"]["optimizers"] == ["optimizer"]
            names = {r.path for r in manifest.files}
            assert {f"rank{r:05d}-part000.distcp" for r in range(world_size)} <= names, names
            assert not any(n.endswith(".safetensors") for n in names)
            assert {"progress", "scheduler", "rng"} <= set(manifest.components)


@pytest.mark.parametrize(
    ("scenario", "world_size", "target"),
    [("exact-local-2", 2, 0), ("exact-local-4", 4, 0), ("exact-s3-2", 2, 1)],
    ids=["local-2", "local-4", "s3-2"],
)
def test_resume_in_new_processes_repeats_the_uninterrupted_losses_bit_for_bit(
    saved: dict[Any, Any], resumed: dict[str, list[dict[str, Any]]], scenario: str, world_size: int, target: int
) -> None:
    for rank, (run, result) in enumerate(zip(saved[world_size], resumed[scenario], strict=True)):
        assert saved[world_size][0]["paths"][target].endswith("checkpoint-1")
        result = _ok(result)
        reference = run["reference_losses"]
        assert run["losses_before_save"] == reference[:SAVE_AFTER], rank  # the interrupted run is the same run
        at_save = unpack(run["saved"])
        before, loaded = unpack(result["before"]), unpack(result["loaded"])
        assert _tensors_all_differ(before, at_save) == [], rank
        assert before["progress"]["step"] == 0 and at_save["progress"]["step"] == SAVE_AFTER
        assert _differing(before["rng"], at_save["rng"]) != [], rank  # each rank's RNG must come back
        assert _differing(loaded, at_save) == [], (rank, "state after the load is not the state saved")
        assert len(result["losses"]) == TOTAL_STEPS - SAVE_AFTER
        assert result["losses"] == reference[SAVE_AFTER:], (rank, result["losses"], reference)
        assert result["final"] == run["reference_final"], rank  # final model and optimizer, bit for bit


@pytest.mark.parametrize(
    ("scenario", "saved_on", "loaded_on"),
    [
        ("reshard-4-to-2", 4, 2),
        ("reshard-4-to-1-unsharded", 4, 1),
        ("reshard-4-to-1-mesh-of-one", 4, 1),
        ("reshard-2-to-4", 2, 4),
    ],
    ids=["4-to-2", "4-to-1-unsharded", "4-to-1-mesh-of-one", "2-to-4"],
)
def test_resume_at_another_world_size_restores_gathered_state_bit_for_bit(
    saved: dict[Any, Any], resumed: dict[str, list[dict[str, Any]]], scenario: str, saved_on: int, loaded_on: int
) -> None:
    at_save = unpack(saved[saved_on][0]["saved"])  # gathered: the same on every rank that saved
    assert _differing(at_save["model"], unpack(saved[saved_on][-1]["saved"])["model"]) == []
    results = resumed[scenario]
    assert len(results) == loaded_on
    for rank, result in enumerate(results):
        result = _ok(result)
        before, loaded = unpack(result["before"]), unpack(result["loaded"])
        assert _tensors_all_differ(before, at_save) == [], rank
        assert _differing(loaded["model"], at_save["model"]) == [], rank
        assert _differing(loaded["optim"], at_save["optim"]) == [], rank  # exp_avg, exp_avg_sq, step, groups
        assert loaded["progress"] == at_save["progress"], rank
        assert _differing(loaded["scheduler"], at_save["scheduler"]) == [], rank


def test_truncated_shard_file_is_refused_on_every_rank_naming_it(
    resumed: dict[str, list[dict[str, Any]]],
) -> None:
    victim = resumed["victim"][0]["url"]
    results = resumed["truncated"]
    assert len(results) == 2
    for rank, result in enumerate(results):
        result = _ok(result)
        before = unpack(result["before"])
        for name in ("explicit", "latest"):
            attempt = result["attempts"][name]
            assert attempt["raised"] is not None, (rank, name, "the damaged checkpoint was loaded")
            assert not attempt["raised"].startswith("not a"), (rank, name, attempt["message"])
            assert _differing(unpack(attempt["after"]), before) == [], (rank, name, "something was loaded")
        explicit = result["attempts"]["explicit"]
        assert explicit["raised"] == "IncompleteCheckpointError", explicit
        assert victim in explicit["message"], (rank, explicit["message"])
        latest = result["attempts"]["latest"]
        # The run's only checkpoint is not complete any more: load(None) finds nothing to resume.
        assert latest["raised"] == "CheckpointNotFoundError", latest


def test_corrupt_shard_file_of_the_right_size_fails_the_load_with_a_ckptio_error_on_every_rank(
    resumed: dict[str, list[dict[str, Any]]],
) -> None:
    """Sizes match the manifest, so discovery takes the checkpoint: the load itself must refuse it."""
    flipped = resumed["flipped"][0]["url"]
    for rank, result in enumerate(resumed["corrupt"]):
        result = _ok(result)
        for name in ("explicit", "latest"):
            attempt = result["attempts"][name]
            assert attempt["raised"] is not None, (rank, name, "the corrupt checkpoint was loaded")
            assert not attempt["raised"].startswith("not a"), (rank, name, attempt["message"])
            assert flipped in attempt["message"], (rank, name, attempt["message"])


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def rank_failures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """On 3 ranks: checkpoint-1 saved; rank 1's shard write raises (checkpoint-2), then it dies
    writing (checkpoint-3). Every report, by file name, and the run's URL."""
    root = tmp_path_factory.mktemp("rank_failures")
    output, reports = str(root / "run"), root / "reports"
    reports.mkdir()
    with pytest.raises(AssertionError, match=r"ranks failed: \[\]; ranks that never finished: \[1\]"):
        run_ranks(rank_fails_mid_sharded_save, 3, output, str(reports), request.param, timeout=SPAWN_TIMEOUT)
    return {"output": output, **{p.name: json.loads(p.read_text()) for p in reports.iterdir()}}


def _assert_previous_checkpoint_is_latest(output: str) -> None:
    latest = find_latest_checkpoint(output)
    assert latest is not None and latest.endswith("checkpoint-1"), latest
    status = {e.name: e.is_complete for e in list_checkpoints(output)}
    assert status.get("checkpoint-1") is True, status
    assert not any(complete for name, complete in status.items() if name != "checkpoint-1"), status


def test_shard_write_failing_on_one_rank_raises_its_ckptio_error_on_every_rank(rank_failures: dict[str, Any]) -> None:
    for rank in range(3):
        outcome = rank_failures[f"rank{rank}-error.json"]
        assert outcome["raised"] == "StorageError", (rank, outcome["raised"], outcome["message"])
        assert "injected failure" in outcome["message"] and "checkpoint-2" in outcome["message"], outcome
        assert outcome["latest"].endswith("checkpoint-1"), (rank, outcome)
    _assert_previous_checkpoint_is_latest(rank_failures["output"])


def test_rank_killed_mid_sharded_save_fails_the_others_and_keeps_the_previous_checkpoint(
    rank_failures: dict[str, Any],
) -> None:
    assert sorted(k for k in rank_failures if k.endswith("-death.json")) == ["rank0-death.json", "rank2-death.json"]
    for rank in (0, 2):
        outcome = rank_failures[f"rank{rank}-death.json"]
        assert outcome["raised"] is not None, (rank, outcome)
        assert not outcome["raised"].startswith("not a"), (rank, outcome["message"])
        assert "checkpoint-3" in outcome["message"], (rank, outcome["message"])
        assert outcome["waited_s"] < 60, (rank, outcome)  # bounded: not gloo's 30-minute default
        assert outcome["latest"].endswith("checkpoint-1"), (rank, outcome)
    _assert_previous_checkpoint_is_latest(rank_failures["output"])
