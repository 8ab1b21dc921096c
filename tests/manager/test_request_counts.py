"""The metadata plane: storage requests per save and per resume do not grow with the run or the world."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from request_count_workers import metadata_requests, run, run_rank

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "state"))
from state_spawn import run_ranks  # noqa: E402

EARLY, LATE = 5, 14  # rotation (keep-3) is under way by the early one


@pytest.mark.parametrize("limit", [None, 3], ids=["keep-all", "keep-3"])
def test_save_and_resume_cost_the_same_early_and_late_in_a_run(backend_url, limit: int | None) -> None:
    counts = run(backend_url.url, backend_url.storage_options, saves=LATE, measure=(EARLY, LATE), limit=limit)
    assert counts[f"save@{EARLY}"] == counts[f"save@{LATE}"], counts
    assert counts[f"resume@{EARLY}"] == counts[f"resume@{LATE}"], counts
    assert counts[f"resumed_step@{LATE}"] == LATE
    for key in (f"save@{LATE}", f"resume@{LATE}"):
        assert counts[key].get("stat", 0) == 0 and counts[key].get("exists", 0) == 0, (key, counts[key])
    # A resume lists checkpoints/ once; a save lists it once, the new folder and (rotating) the deleted one.
    assert counts[f"save@{LATE}"]["list"] <= (3 if limit is None else 5), counts
    assert counts[f"resume@{LATE}"]["list"] == 1, counts
    assert counts[f"resume@{LATE}"]["read"] <= 20, counts  # manifest, index, shards, component files
    # The resume constructs its manager: on an object store, the write probe reads once, writes and deletes.
    probe = 1 if backend_url.name in ("s3", "gcs") else 0
    assert (counts[f"resume@{LATE}"].get("write", 0), counts[f"resume@{LATE}"].get("delete", 0)) == (probe, probe)


def test_rotation_deletes_a_checkpoint_in_one_batch(backend_url) -> None:
    counts = run(backend_url.url, backend_url.storage_options, saves=6, measure=(6,), limit=2)
    save = counts["save@6"]
    # The new checkpoint's marker and the rotated one's manifest one by one (the manifest goes first,
    # so a half-deleted checkpoint never looks complete); every other file of it in batches.
    assert save.get("delete", 0) == 2, save
    assert save.get("delete_many", 0) == 2, save


def test_s3_sees_no_per_file_head_during_a_save(backend_url, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend_url.name != "s3":
        pytest.skip("counts the S3 API calls s3fs makes; the other backends have no HEAD")
    import s3fs

    calls: Counter[str] = Counter()
    original = s3fs.S3FileSystem._call_s3

    async def counted(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        return await original(self, method, *args, **kwargs)

    run(backend_url.url, backend_url.storage_options, saves=3, measure=(), limit=2)  # a run with history
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    counts = run(backend_url.url, backend_url.storage_options, saves=1, measure=(), limit=2)
    assert counts == {}
    # One HEAD and one listing are the write probe's, at construction: s3fs stats the absent object it
    # reads to tell a missing bucket from a missing key. The save itself makes none.
    assert calls["head_object"] == 1, dict(calls)
    assert calls["list_objects_v2"] <= 5, dict(calls)  # checkpoints/, the new folder, the rotated one twice


def test_only_rank_zero_discovers_at_world_size_four(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    results = run_ranks(run_rank, 4, url, 9, (5, 9), 3, timeout=240)
    for rank, counts in enumerate(results):
        assert counts["resumed_step@9"] == 9
        for key in ("save@5", "save@9", "resume@5", "resume@9"):
            requests = counts[key]
            if rank == 0:
                assert metadata_requests(requests) > 0
            else:
                assert metadata_requests(requests) == 0, (rank, key, requests)
                assert requests.get("delete", 0) == requests.get("delete_many", 0) == 0, (rank, key, requests)
        assert counts["save@5"] == counts["save@9"], (rank, counts)
        assert counts["resume@5"] == counts["resume@9"], (rank, counts)
