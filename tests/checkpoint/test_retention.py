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
from ckptio.storage import FaultInjectingStorage, ObjectInfo, Storage

COMPLETE, INCOMPLETE, NOT_A_CHECKPOINT = (
    CheckpointStatus.COMPLETE,
    CheckpointStatus.INCOMPLETE,
    CheckpointStatus.NOT_A_CHECKPOINT,
)


_SAVE_FILES = ("model.safetensors", "optimizer_state.pt", IN_PROGRESS_NAME)


def _objects(*keys: str) -> tuple[ObjectInfo, ...]:
    return tuple(ObjectInfo(key, 1, None) for key in keys)


def _entry(
    number: int,
    second: int,
    status: CheckpointStatus = COMPLETE,
    *,
    error: str | None = None,
    files: tuple[str, ...] = _SAVE_FILES,
) -> CheckpointEntry:
    stamp = f"2024-01-01T00:00:{second:02d}.000000+00:00"
    return CheckpointEntry(f"checkpoint-{number}", number, status, stamp, None, error=error, objects=_objects(*files))


def _legacy(
    number: int, mtime: float | None, status: CheckpointStatus, files: tuple[str, ...] = _SAVE_FILES
) -> CheckpointEntry:
    return CheckpointEntry(f"checkpoint-{number}", number, status, None, mtime, objects=_objects(*files))


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
        _legacy(3, 1.0, NOT_A_CHECKPOINT, ("notes.txt",)),  # unrecognised content
        _legacy(4, 1.0, NOT_A_CHECKPOINT, ("model-00001-of-00002.safetensors", "data.csv")),  # mixed in
        _entry(6, 1, INCOMPLETE, files=(IN_PROGRESS_NAME, "sub/optimizer_state.pt")),  # a nested folder
        _entry(9, 2, INCOMPLETE),  # numbered after the newest: a save in progress despite an older clock
        _entry(5, 3),
    ]
    assert select_for_deletion(entries, keep=1, preserved=set()) == []


def test_deletes_an_older_folder_holding_only_checkpoint_files() -> None:
    shards_without_index = _legacy(
        1, 1.0, NOT_A_CHECKPOINT, ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    )
    components_only = _legacy(2, 2.0, NOT_A_CHECKPOINT, ("optimizer_state.pt", "rng_state_rank_0.pt", "eval_metrics.json"))
    newer_shards = _legacy(9, 2e9, NOT_A_CHECKPOINT, ("model-00001-of-00002.safetensors",))  # after the newest
    entries = [shards_without_index, components_only, _entry(5, 3), newer_shards]
    assert select_for_deletion(entries, keep=1, preserved=set()) == ["checkpoint-1", "checkpoint-2"]


def test_preserved_checkpoints_count_toward_the_limit() -> None:
    entries = [_entry(n, n) for n in range(1, 6)]
    # save_total_limit=2 with an older best: the best and the newest, not three.
    assert select_for_deletion(entries, keep=2, preserved={"checkpoint-1"}) == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert select_for_deletion(entries, keep=3, preserved={"checkpoint-1"}) == ["checkpoint-2", "checkpoint-3"]
    # More preserved than the limit: all of them and the newest stay, even above the limit.
    assert select_for_deletion(entries, keep=2, preserved={"checkpoint-1", "checkpoint-2"}) == [
        "checkpoint-3",
        "checkpoint-4",
    ]
    # A preserved name that is not there takes no place.
    assert select_for_deletion(entries, keep=2, preserved={"checkpoint-99"}) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]


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
    assert checkpoint_names("s3://b/r/checkpoints/checkpoint-12") == {"checkpoint-12"}  # one path, not characters


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
    deleted = maybe_delete_oldest_checkpoint(
        backend_url.url, 3, preserved_checkpoints=[best], storage_options=backend_url.storage_options
    )
    assert deleted == ["checkpoint-2", "checkpoint-3"]  # the best counts toward the 3 kept
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
    list_checkpoints(storage)  # this process has now read both manifests: rotation lists once, reads none
    # Fail right after the manifest of checkpoint-1 is deleted (list, marker written, manifest deleted).
    faulty = FaultInjectingStorage(storage, fail_after_ops=3)
    assert maybe_delete_oldest_checkpoint(faulty, 1) == []
    assert faulty.log[-3:] == [f"write {IN_PROGRESS_NAME}", f"delete {MANIFEST_NAME}", "list "]
    statuses = {e.name: e.status for e in list_checkpoints(storage)}
    assert statuses == {"checkpoint-1": INCOMPLETE, "checkpoint-2": COMPLETE}
    make_checkpoint("checkpoint-3")  # the next save commits after the failed deletion
    assert maybe_delete_oldest_checkpoint(storage, 1) == ["checkpoint-2", "checkpoint-1"]  # oldest first
    assert _names(storage) == ["checkpoint-3"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_seed_style_best_checkpoint_argument_is_preserved(make_checkpoint, storage, backend_url, at) -> None:
    for n in (1, 2, 3):
        make_checkpoint(f"checkpoint-{n}", at=at(n))
    best = f"{backend_url.url}/checkpoints/checkpoint-1"
    deleted = maybe_delete_oldest_checkpoint(backend_url.url, 2, best, storage_options=backend_url.storage_options)
    assert deleted == ["checkpoint-2"]
    assert _names(storage) == ["checkpoint-1", "checkpoint-3"]


def test_best_checkpoint_is_a_deprecated_alias(make_checkpoint, storage, at) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    make_checkpoint("checkpoint-2", at=at(2))
    with pytest.warns(DeprecationWarning, match="preserved_checkpoints"):
        assert maybe_delete_oldest_checkpoint(storage, 1, best_checkpoint="checkpoint-1") == []


def test_a_single_preserved_path_means_that_one_checkpoint(make_checkpoint, storage, at) -> None:
    for n in (1, 2, 3):
        make_checkpoint(f"checkpoint-{n}", at=at(n))
    assert maybe_delete_oldest_checkpoint(storage, 2, preserved_checkpoints=storage.url_of("checkpoints/checkpoint-2")) == [
        "checkpoint-1"
    ]
    assert _names(storage) == ["checkpoint-2", "checkpoint-3"]


def test_rotation_removes_an_older_folder_of_shards_without_index_and_keeps_foreign_ones(
    make_checkpoint, storage, at
) -> None:
    storage.write_bytes("checkpoints/checkpoint-1/model-00001-of-00002.safetensors", b"x")
    storage.write_bytes("checkpoints/checkpoint-2/model-00001-of-00002.safetensors", b"x")
    storage.write_bytes("checkpoints/checkpoint-2/my_notes.txt", b"mine")
    make_checkpoint("checkpoint-3")  # committed now: newer than both folders
    assert maybe_delete_oldest_checkpoint(storage, 1) == ["checkpoint-1"]
    assert storage.walk("checkpoints/checkpoint-1") == []
    assert storage.read_bytes("checkpoints/checkpoint-2/my_notes.txt") == b"mine"
