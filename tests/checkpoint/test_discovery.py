"""Discovery: listing checkpoints, ordering them, and finding the newest complete one."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from ckptio.checkpoint import (
    MANIFEST_NAME,
    CheckpointStatus,
    find_latest_checkpoint,
    list_checkpoints,
)
from ckptio.storage import Storage


def _latest(backend_url) -> str | None:
    return find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options)


def _path(backend_url, name: str) -> str:
    return f"{backend_url.url}/checkpoints/{name}"


def test_empty_run_has_no_checkpoint(storage: Storage, backend_url) -> None:
    assert list_checkpoints(storage) == []
    assert _latest(backend_url) is None


def test_newer_timestamp_beats_higher_number(make_checkpoint, backend_url, at) -> None:
    make_checkpoint("checkpoint-10", at=at(1))
    make_checkpoint("checkpoint-2", at=at(2))
    assert _latest(backend_url) == _path(backend_url, "checkpoint-2")


def test_number_breaks_a_timestamp_tie_numerically(make_checkpoint, backend_url, at) -> None:
    make_checkpoint("checkpoint-10", at=at(5))
    make_checkpoint("checkpoint-9", at=at(5))
    assert _latest(backend_url) == _path(backend_url, "checkpoint-10")
    assert [e.name for e in list_checkpoints(backend_url.url, storage_options=backend_url.storage_options)] == [
        "checkpoint-9",
        "checkpoint-10",
    ]


def test_timestamps_order_even_against_write_order(make_checkpoint, storage, at) -> None:
    make_checkpoint("checkpoint-1", at=at(30))
    make_checkpoint("checkpoint-2", at=at(10))  # written last, but older by its manifest
    make_checkpoint("checkpoint-3", at=at(20))
    entries = list_checkpoints(storage)
    assert [e.name for e in entries] == ["checkpoint-2", "checkpoint-3", "checkpoint-1"]
    assert [e.timestamp for e in entries] == [at(10), at(20), at(30)]
    assert all(e.mtime is None for e in entries)  # no mtime lookups where a manifest exists
    assert find_latest_checkpoint(storage) == storage.url_of("checkpoints/checkpoint-1")


def test_weights_and_marker_without_manifest_are_never_found(make_checkpoint, backend_url, at) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    make_checkpoint("checkpoint-2", commit=False, marker=True)  # the crashed save: weights written, no manifest
    assert _latest(backend_url) == _path(backend_url, "checkpoint-1")
    entries = list_checkpoints(backend_url.url, storage_options=backend_url.storage_options)
    statuses = {e.name: e.status for e in entries}
    assert statuses == {"checkpoint-1": CheckpointStatus.COMPLETE, "checkpoint-2": CheckpointStatus.INCOMPLETE}


def test_checkpoint_with_a_truncated_file_is_skipped(make_checkpoint, backend_url, at) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    newer = make_checkpoint("checkpoint-2", at=at(2))
    newer.write_bytes("model.safetensors", b"short")
    assert _latest(backend_url) == _path(backend_url, "checkpoint-1")


def test_a_corrupt_manifest_is_incomplete_with_a_warning_not_an_error(
    make_checkpoint, storage, at, caplog: pytest.LogCaptureFixture
) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    broken = make_checkpoint("checkpoint-2", at=at(2))
    broken.write_bytes(MANIFEST_NAME, b"{ not json")
    with caplog.at_level(logging.WARNING, logger="ckptio.checkpoint.discovery"):
        entries = {e.name: e for e in list_checkpoints(storage)}
        latest = find_latest_checkpoint(storage)
    assert latest == storage.url_of("checkpoints/checkpoint-1")
    assert entries["checkpoint-2"].status is CheckpointStatus.INCOMPLETE
    assert broken.url_of(MANIFEST_NAME) in (entries["checkpoint-2"].error or "")
    assert broken.url_of(MANIFEST_NAME) in caplog.text


def test_entries_describe_each_checkpoint(make_checkpoint, storage, at) -> None:
    make_checkpoint("checkpoint-3", {"model.safetensors": b"x" * 7, "a.pt": b"y" * 5}, at=at(3))
    make_checkpoint("checkpoint-final", at=at(4))
    storage.write_bytes("checkpoints/README.md", b"not a checkpoint directory")
    storage.write_bytes("checkpoints/other-run/model.safetensors", b"ignored: not checkpoint-*")
    entries = list_checkpoints(storage)
    assert [(e.name, e.checkpoint_id, e.timestamp, e.size_bytes) for e in entries] == [
        ("checkpoint-3", 3, at(3), 12),
        ("checkpoint-final", None, at(4), 96),
    ]
    assert entries[0].url == storage.url_of("checkpoints/checkpoint-3")


def test_discovery_sees_new_and_deleted_checkpoints_at_once(make_checkpoint, storage, at) -> None:
    make_checkpoint("checkpoint-1", at=at(1))
    assert find_latest_checkpoint(storage) == storage.url_of("checkpoints/checkpoint-1")
    make_checkpoint("checkpoint-2", at=at(2))
    assert find_latest_checkpoint(storage) == storage.url_of("checkpoints/checkpoint-2")
    storage.delete_prefix("checkpoints/checkpoint-2")
    assert find_latest_checkpoint(storage) == storage.url_of("checkpoints/checkpoint-1")


# -- directories without a manifest: modification time ------------------------------


def test_modification_time_places_directories_without_a_manifest(make_checkpoint, storage, at) -> None:
    make_checkpoint("checkpoint-5", at="2000-01-01T00:00:00.000000+00:00")
    make_checkpoint("checkpoint-1", commit=False)  # an older tool: weights only, written just now
    assert find_latest_checkpoint(storage) == storage.url_of("checkpoints/checkpoint-1")
    [legacy] = [e for e in list_checkpoints(storage) if e.name == "checkpoint-1"]
    assert legacy.timestamp is None and legacy.mtime is not None
    make_checkpoint("checkpoint-7", at="2100-01-01T00:00:00.000000+00:00")
    assert find_latest_checkpoint(storage) == storage.url_of("checkpoints/checkpoint-7")


# -- no checkpoints/ folder: the directory itself ----------------------------------


def _plain_model(storage: Storage) -> None:
    storage.write_bytes("model.safetensors", safetensors_bytes({"w": torch.zeros(2)}))


def test_a_plain_model_directory_is_its_own_latest_checkpoint(storage: Storage, backend_url) -> None:
    assert _latest(backend_url) is None
    _plain_model(storage)
    assert _latest(backend_url) == backend_url.url
    assert find_latest_checkpoint(storage) == storage.url


def test_a_checkpoints_folder_hides_the_directory_itself(make_checkpoint, storage, backend_url) -> None:
    _plain_model(storage)
    make_checkpoint("checkpoint-1", commit=False, marker=True)
    assert _latest(backend_url) is None


def test_latest_uses_utc_across_offsets(make_checkpoint, storage) -> None:
    make_checkpoint("checkpoint-1", at="2024-01-01T12:00:00.000000+02:00")  # 10:00 UTC
    make_checkpoint("checkpoint-2", at="2024-01-01T11:00:00.000000+00:00")  # 11:00 UTC
    assert find_latest_checkpoint(storage) == storage.url_of("checkpoints/checkpoint-2")
