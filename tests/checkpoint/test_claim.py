"""The in-progress marker as a claim: a live save's directory is never touched, a dead one's is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from ckptio import CheckpointConfig, CheckpointManager, ConcurrentSaveError
from ckptio.checkpoint import (
    CheckpointManifest,
    begin_checkpoint,
    commit_checkpoint,
    utc_timestamp,
)
from ckptio.checkpoint.claim import STALE_AFTER_S, live_marker_owner, marker_bytes
from ckptio.checkpoint.layout import IN_PROGRESS_NAME, MANIFEST_NAME, checkpoint_key
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord, checksum_bytes


def _foreign_marker(*, age_s: float, host: str = "another-host", pid: int = 4242) -> bytes:
    """A marker written by a save in another process, whose last heartbeat was ``age_s`` ago."""
    marker = json.loads(marker_bytes(checkpoint_id=3, world_size=2, action="save", token="f" * 32))
    marker.update(host=host, pid=pid, heartbeat_unix=time.time() - age_s)
    return json.dumps(marker).encode()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _snapshot(storage: Storage) -> dict[str, bytes]:
    return {key: storage.read_bytes(key) for key in storage.walk("")}


def _manifest(files: dict[str, bytes]) -> CheckpointManifest:
    return CheckpointManifest(
        checkpoint_path=".",
        world_size=1,
        timestamp=utc_timestamp(),
        files=[FileRecord(k, len(v), checksum_bytes(v)) for k, v in files.items()],
    )


def test_a_live_save_is_refused_and_its_files_are_untouched(storage: Storage) -> None:
    storage.write_bytes(IN_PROGRESS_NAME, _foreign_marker(age_s=1))
    storage.write_bytes("model.safetensors", b"theirs")
    before = _snapshot(storage)
    with pytest.raises(ConcurrentSaveError, match="another save is writing it .*another-host"):
        begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    assert _snapshot(storage) == before


def test_a_stale_marker_is_taken_over(storage: Storage) -> None:
    storage.write_bytes(IN_PROGRESS_NAME, _foreign_marker(age_s=STALE_AFTER_S + 5))
    claim = begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    storage.write_bytes("model.safetensors", b"ours")
    commit_checkpoint(storage, _manifest({"model.safetensors": b"ours"}), claim)
    assert storage.is_file(MANIFEST_NAME) and not storage.is_file(IN_PROGRESS_NAME)


def test_a_dead_process_on_this_host_is_taken_over_at_once(storage: Storage) -> None:
    storage.write_bytes(IN_PROGRESS_NAME, _foreign_marker(age_s=0, host=socket.gethostname(), pid=_dead_pid()))
    begin_checkpoint(storage, checkpoint_id=3, world_size=1).release()


def test_a_released_claim_of_this_process_is_taken_over(storage: Storage) -> None:
    first = begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    with pytest.raises(ConcurrentSaveError):  # held: even this process may not take it
        begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    first.release()  # as a failed save does
    assert live_marker_owner(storage) is None
    begin_checkpoint(storage, checkpoint_id=3, world_size=1).release()


def test_a_save_whose_claim_was_taken_over_is_not_committed(storage: Storage) -> None:
    stalled = begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    stalled.release()  # it stalled past the heartbeat: another saver takes over
    taker = begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    with pytest.raises(ConcurrentSaveError, match="took this checkpoint over"):
        commit_checkpoint(storage, _manifest({}), stalled)
    assert not storage.is_file(MANIFEST_NAME)
    commit_checkpoint(storage, _manifest({}), taker)
    assert storage.is_file(MANIFEST_NAME)


def test_the_heartbeat_keeps_a_long_save_alive(storage: Storage) -> None:
    claim = begin_checkpoint(storage, checkpoint_id=3, world_size=1, stale_after_s=0.5).keep_alive(interval_s=0.1)
    try:
        first = json.loads(storage.read_bytes(IN_PROGRESS_NAME))["heartbeat_unix"]
        deadline = time.monotonic() + 30
        while json.loads(storage.read_bytes(IN_PROGRESS_NAME))["heartbeat_unix"] == first:
            assert time.monotonic() < deadline, "the heartbeat never refreshed the marker"
            time.sleep(0.05)
        assert json.loads(storage.read_bytes(IN_PROGRESS_NAME))["token"] == claim.token
    finally:
        claim.release()


def test_the_heartbeat_never_overwrites_a_taker(storage: Storage) -> None:
    claim = begin_checkpoint(storage, checkpoint_id=3, world_size=1)
    storage.write_bytes(IN_PROGRESS_NAME, _foreign_marker(age_s=0))
    claim.refresh()
    assert json.loads(storage.read_bytes(IN_PROGRESS_NAME))["host"] == "another-host"
    claim.release()


def test_the_manager_refuses_a_target_a_live_save_holds(backend_url) -> None:
    model = nn.Linear(4, 4)
    config = CheckpointConfig(output_dir=backend_url.url, storage_options=backend_url.storage_options)
    manager = CheckpointManager(config, None, model=model)
    manager.save_checkpoint(checkpoint_id=1)
    target = manager.storage.child(checkpoint_key(2))
    target.write_bytes(IN_PROGRESS_NAME, _foreign_marker(age_s=1))
    target.write_bytes("model.safetensors", b"in flight")
    before = _snapshot(manager.storage)
    with pytest.raises(ConcurrentSaveError, match="checkpoint-2"):
        manager.save_checkpoint(checkpoint_id=2)
    assert _snapshot(manager.storage) == before
    with torch.no_grad():
        model.weight.zero_()
    manager.load_checkpoint(None)  # checkpoint-1 is still the latest complete one
    assert model.weight.abs().sum() > 0
