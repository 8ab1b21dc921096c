"""Rotation: the pure policy, then deleting on every backend."""

from __future__ import annotations

import pytest

from ckptio.checkpoint import (
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    CheckpointEntry,
    CheckpointStatus,
    checkpoint_names,
    find_latest_checkpoint,
    list_checkpoints,
    maybe_delete_oldest_checkpoint,
    select_for_deletion,
)
from ckptio.errors import InvalidArgumentError
from ckptio.storage import FaultInjectingStorage, Storage

COMPLETE, INCOMPLETE, NOT_A_CHECKPOINT = (
    CheckpointStatus.COMPLETE,
    CheckpointStatus.INCOMPLETE,
    CheckpointStatus.NOT_A_CHECKPOINT,
)


def _entry(
    number: int, second: int, status: CheckpointStatus = COMPLETE, *, error: str | None = None
) -> CheckpointEntry:
    stamp = f"2024-01-01T00:00:{second:02d}.000000+00:00"
    return CheckpointEntry(f"checkpoint-{number}", number, status, stamp, None, error=error)


def _legacy(number: int, mtime: float | None, status: CheckpointStatus) -> CheckpointEntry:
    return CheckpointEntry(f"checkpoint-{number}", number, status, None, mtime)


# -- the pure policy ----------------------------------------------------------------


def test_keeps_the_newest_n_complete() -> None:
    entries = [_entry(n, n) for n in range(1, 6)]
    assert select_for_deletion(entries, keep=2, preserved=set()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert select_for_deletion(entries, keep=5, preserved=set()) == []
    assert select_for_deletion(entries, keep=9, preserved=set()) == []


def test_orders_by_timestamp_not_by_number() -> None:
    entries = [_entry(10, 1), _entry(2, 2)]
    assert select_for_deletion(entries, keep=1, preserved=set()) == ["checkpoint-10"]


def test_never_deletes_preserved_or_the_newest_complete() -> None:
    entries = [_entry(n, n) for n in range(1, 6)]
    assert select_for_deletion(entries, keep=1, preserved={"checkpoint-2", "checkpoint-5"}) == [
        "checkpoint-1",
        "checkpoint-3",
        "checkpoint-4",
    ]
    newest_incomplete_after = [*entries, _entry(6, 6, INCOMPLETE)]
    assert "checkpoint-5" not in select_for_deletion(newest_incomplete_after, keep=1, preserved=set())


def test_deletes_incomplete_leftovers_older_than_the_newest_complete() -> None:
    entries = [_entry(1, 1, INCOMPLETE), _entry(2, 2), _entry(3, 3, INCOMPLETE), _entry(4, 4), _entry(5, 5, INCOMPLETE)]
    assert select_for_deletion(entries, keep=5, preserved=set()) == ["checkpoint-1", "checkpoint-3"]
    assert select_for_deletion(entries, keep=1, preserved=set()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_never_deletes_what_it_cannot_judge() -> None:
    entries = [
        _entry(1, 1, INCOMPLETE, error="malformed manifest"),
        _legacy(2, None, INCOMPLETE),  # age unknown
        _legacy(3, 1.0, NOT_A_CHECKPOINT),  # unrecognised content
        _entry(9, 2, INCOMPLETE),  # numbered after the newest: a save in progress despite an older clock
        _entry(5, 3),
    ]
    assert select_for_deletion(entries, keep=1, preserved=set()) == []


def test_with_no_complete_checkpoint_nothing_is_deleted() -> None:
    entries = [_entry(1, 1, INCOMPLETE), _entry(2, 2, INCOMPLETE)]
    assert select_for_deletion(entries, keep=1, preserved=set()) == []


def test_mixes_manifest_times_and_modification_times() -> None:
    old_legacy = _legacy(1, 0.0, COMPLETE)  # 1970: older than any manifest
    assert select_for_deletion([old_legacy, _entry(2, 1)], keep=1, preserved=set()) == ["checkpoint-1"]


@pytest.mark.parametrize("keep", [0, -1, True, 1.5, None])
def test_a_limit_below_one_raises(keep: object) -> None:
    with pytest.raises(InvalidArgumentError, match="nothing was deleted"):
        select_for_deletion([_entry(1, 1)], keep=keep, preserved=set())  # type: ignore[arg-type]


def test_checkpoint_names_accepts_names_paths_and_urls() -> None:
    given = ["checkpoint-1", "/run/checkpoints/checkpoint-2/", "s3://b/r/checkpoints/checkpoint-3"]
    assert checkpoint_names(given) == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    assert checkpoint_names(None) == set()


# -- on storage -----------------------------------------------------------------------


def _names(storage: Storage) -> list[str]:
    return [e.name for e in list_checkpoints(storage)]


def test_rotation_deletes_old_and_leftovers_keeps_preserved(make_checkpoint, storage, backend_url, at) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    make_checkpoint("checkpoint-2", commit=False, marker=True)  # a crashed save, modified now
    for n in (3, 4, 5):
        make_checkpoint(f"checkpoint-{n}")  # committed after it, timestamped now
    best = f"{backend_url.url}/checkpoints/checkpoint-1"
    assert _names(storage) == [f"checkpoint-{n}" for n in range(1, 6)]
    deleted = maybe_delete_oldest_checkpoint(backend_url.url, 2, [best], storage_options=backend_url.storage_options)
    assert deleted == ["checkpoint-2", "checkpoint-3"]
    assert _names(storage) == ["checkpoint-1", "checkpoint-4", "checkpoint-5"]
    assert storage.walk("checkpoints/checkpoint-3") == []
    assert find_latest_checkpoint(storage) == storage.url_of("checkpoints/checkpoint-5")


def test_an_in_progress_save_newer_than_the_newest_complete_survives(make_checkpoint, storage, at) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    make_checkpoint("checkpoint-2", at=at(2))
    make_checkpoint("checkpoint-3", commit=False, marker=True)  # mtime: now, newer than every manifest
    assert maybe_delete_oldest_checkpoint(storage, 1) == ["checkpoint-1"]
    assert _names(storage) == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_one_deletes_nothing(make_checkpoint, storage, at, limit: int) -> None:
    for n in range(1, 4):
        make_checkpoint(f"checkpoint-{n}", at=at(n))
    before = storage.walk()
    with pytest.raises(InvalidArgumentError):
        maybe_delete_oldest_checkpoint(storage, limit)
    assert storage.walk() == before


def test_a_malformed_manifest_is_never_deleted(make_checkpoint, storage, at) -> None:
    broken = make_checkpoint("checkpoint-1", at=at(1))
    broken.write_bytes(MANIFEST_NAME, b"[]")
    make_checkpoint("checkpoint-2", at=at(2))
    make_checkpoint("checkpoint-3", at=at(3))
    assert maybe_delete_oldest_checkpoint(storage, 1) == ["checkpoint-2"]
    assert broken.read_bytes(MANIFEST_NAME) == b"[]"
    assert _names(storage) == ["checkpoint-3", "checkpoint-1"]  # unreadable: placed by modification time


def test_deletion_removes_the_manifest_first(make_checkpoint, storage, at) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    make_checkpoint("checkpoint-2", at=at(2))
    faulty = FaultInjectingStorage(storage)
    assert maybe_delete_oldest_checkpoint(faulty, 1) == ["checkpoint-1"]
    deletes = [line for line in faulty.log if line.startswith("delete")]
    assert deletes[0] == f"delete {MANIFEST_NAME}"


def test_a_failed_deletion_is_skipped_and_finished_by_a_later_rotation(make_checkpoint, storage, at) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    make_checkpoint("checkpoint-2", at=at(2))
    probe = FaultInjectingStorage(storage)
    list_checkpoints(probe)
    # Fail right after the manifest of checkpoint-1 is deleted (marker written, manifest deleted).
    faulty = FaultInjectingStorage(storage, fail_after_ops=probe.operations + 2)
    assert maybe_delete_oldest_checkpoint(faulty, 1) == []
    assert faulty.log[-3:] == [f"write {IN_PROGRESS_NAME}", f"delete {MANIFEST_NAME}", "list "]
    statuses = {e.name: e.status for e in list_checkpoints(storage)}
    assert statuses == {"checkpoint-1": INCOMPLETE, "checkpoint-2": COMPLETE}
    make_checkpoint("checkpoint-3")  # the next save commits after the failed deletion
    assert maybe_delete_oldest_checkpoint(storage, 1) == ["checkpoint-2", "checkpoint-1"]  # oldest first
    assert _names(storage) == ["checkpoint-3"]
