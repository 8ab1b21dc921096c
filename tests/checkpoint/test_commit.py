"""The commit protocol: marker first, manifest last, deletion in reverse; crash at every step."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ckptio.checkpoint import (
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    CheckpointManifest,
    CheckpointStatus,
    begin_checkpoint,
    checkpoint_status,
    commit_checkpoint,
    delete_checkpoint,
    is_committed,
    utc_timestamp,
)
from ckptio.errors import CheckpointExistsError, InvalidArgumentError, TransientFault
from ckptio.storage import (
    FaultInjectingStorage,
    RetryingStorage,
    RetryPolicy,
    SimulatedCrash,
    Storage,
    StorageWrapper,
)
from ckptio.storage.integrity import FileRecord, checksum_bytes

FILES = {"model.safetensors": b"weights" * 10, "optimizer_state.pt": b"optim"}


def _manifest() -> CheckpointManifest:
    return CheckpointManifest(
        checkpoint_path=".",
        world_size=1,
        timestamp=utc_timestamp(),
        checkpoint_id=3,
        files=[FileRecord(k, len(v), checksum_bytes(v)) for k, v in sorted(FILES.items())],
    )


def _write_files(storage: Storage) -> None:
    for key, data in FILES.items():
        storage.write_bytes(key, data)


def test_begin_writes_only_the_marker(storage: Storage) -> None:
    begin_checkpoint(storage, checkpoint_id=3, world_size=4)
    assert storage.walk() == [IN_PROGRESS_NAME]
    marker = json.loads(storage.read_bytes(IN_PROGRESS_NAME))
    assert (marker["checkpoint_id"], marker["world_size"], marker["action"]) == (3, 4, "save")


@pytest.mark.parametrize("world_size", [0, -1, True, "2"])
def test_begin_refuses_a_bad_world_size(storage: Storage, world_size: object) -> None:
    with pytest.raises(InvalidArgumentError):
        begin_checkpoint(storage, checkpoint_id=3, world_size=world_size)  # type: ignore[arg-type]
    assert storage.walk() == []


def test_weights_after_the_marker_are_incomplete_until_commit(storage: Storage) -> None:
    begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    _write_files(storage)
    assert checkpoint_status(storage) is CheckpointStatus.INCOMPLETE
    assert not is_committed(storage)
    commit_checkpoint(storage, _manifest())
    assert checkpoint_status(storage) is CheckpointStatus.COMPLETE
    assert is_committed(storage)
    assert storage.walk() == sorted([*FILES, MANIFEST_NAME])  # the marker is gone


def test_commit_writes_the_manifest_before_removing_the_marker(storage: Storage) -> None:
    begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    _write_files(storage)
    faulty = FaultInjectingStorage(storage)
    commit_checkpoint(faulty, _manifest())
    assert faulty.log == [f"create {MANIFEST_NAME}", f"delete {IN_PROGRESS_NAME}"]  # created, never overwritten


@pytest.mark.parametrize(("ops", "expected"), [(0, CheckpointStatus.INCOMPLETE), (1, CheckpointStatus.COMPLETE)])
def test_crash_during_commit(storage: Storage, ops: int, expected: CheckpointStatus) -> None:
    begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    _write_files(storage)
    with pytest.raises(SimulatedCrash):
        commit_checkpoint(FaultInjectingStorage(storage, fail_after_ops=ops, crash=True), _manifest())
    assert checkpoint_status(storage) is expected  # a marker left beside a manifest is harmless


def test_delete_removes_the_manifest_first_and_everything(storage: Storage) -> None:
    _write_files(storage)
    commit_checkpoint(storage, _manifest())
    faulty = FaultInjectingStorage(storage)
    delete_checkpoint(faulty)
    deletes = [entry for entry in faulty.log if entry.startswith("delete")]
    assert deletes[0] == f"delete {MANIFEST_NAME}"
    assert storage.walk() == []
    assert checkpoint_status(storage) is CheckpointStatus.NOT_A_CHECKPOINT


def test_a_crash_anywhere_in_delete_never_leaves_a_complete_looking_remnant(storage: Storage) -> None:
    _write_files(storage)
    commit_checkpoint(storage, _manifest())
    full = FaultInjectingStorage(storage.child("probe"))
    _write_files(storage.child("probe"))
    commit_checkpoint(storage.child("probe"), _manifest())
    delete_checkpoint(full)
    for ops in range(full.operations):
        with pytest.raises(SimulatedCrash):
            delete_checkpoint(FaultInjectingStorage(storage, fail_after_ops=ops, crash=True))
        status = checkpoint_status(storage)
        if MANIFEST_NAME in storage.walk():
            assert status is CheckpointStatus.COMPLETE
            assert sorted(storage.walk()) == sorted([*FILES, MANIFEST_NAME, *([IN_PROGRESS_NAME] if ops else [])])
        else:
            assert status is not CheckpointStatus.COMPLETE, (ops, storage.walk())
        # Restore the checkpoint for the next crash point.
        storage.delete_prefix("")
        _write_files(storage)
        commit_checkpoint(storage, _manifest())


# -- the manifest is created, never overwritten ------------------------------------


def test_a_second_commit_never_overwrites_the_first_manifest(storage: Storage) -> None:
    _write_files(storage)
    first = _manifest()
    commit_checkpoint(storage, first)
    other = dataclasses.replace(first, checkpoint_id=4, timestamp=utc_timestamp())
    with pytest.raises(CheckpointExistsError, match="another saver committed first"):
        commit_checkpoint(storage, other)
    assert storage.read_bytes(MANIFEST_NAME) == first.to_bytes()


class _LosesFirstCreateResponse(StorageWrapper):
    """Performs the first exclusive create, then reports a dropped connection (a lost response)."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.lost = 0

    def rewrap(self, inner: Storage) -> StorageWrapper:
        return _LosesFirstCreateResponse(inner)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self.inner.create_exclusive(key, data)
        if not self.lost:
            self.lost += 1
            raise TransientFault(f"connection reset after creating {key}")


def test_a_retried_commit_whose_response_was_lost_succeeds(storage: Storage) -> None:
    _write_files(storage)
    lossy = _LosesFirstCreateResponse(storage)
    retrying = RetryingStorage(lossy, RetryPolicy(base_delay=0.0))
    commit_checkpoint(retrying, _manifest())
    assert lossy.lost == 1
    assert checkpoint_status(storage) is CheckpointStatus.COMPLETE
