"""Validity (SPEC section 3): manifest, in-progress marker, plain model directories; verification."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from ckptio.checkpoint import (
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    CheckpointStatus,
    begin_checkpoint,
    checkpoint_status,
    inspect_checkpoint,
    validate_checkpoint,
    verify_checkpoint,
)
from ckptio.errors import CorruptCheckpointError
from ckptio.storage import CountingStorage, Storage, open_storage

COMPLETE, INCOMPLETE, NOT_A_CHECKPOINT = (
    CheckpointStatus.COMPLETE,
    CheckpointStatus.INCOMPLETE,
    CheckpointStatus.NOT_A_CHECKPOINT,
)


def _shard(value: float) -> bytes:
    return safetensors_bytes({"w": torch.full((4,), value)}, metadata={"format": "pt"})


def _index(*shards: str) -> bytes:
    weight_map = {f"t{i}": shard for i, shard in enumerate(shards)}
    return json.dumps({"metadata": {"total_size": 16 * len(shards)}, "weight_map": weight_map}).encode()


def _write_sharded_model(storage: Storage, *, skip: str | None = None) -> None:
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for number, shard in enumerate(shards):
        if shard != skip:
            storage.write_bytes(shard, _shard(number))
    storage.write_bytes("model.safetensors.index.json", _index(*shards))


def _copy_all(source: Storage, target: Storage) -> None:
    for key in source.walk():
        target.write_bytes(key, source.read_bytes(key))


# -- with a manifest ---------------------------------------------------------


def test_manifest_with_every_file_is_complete(make_checkpoint, backend_url) -> None:
    checkpoint = make_checkpoint("checkpoint-1")
    assert checkpoint_status(checkpoint) is COMPLETE
    assert validate_checkpoint(checkpoint)
    assert validate_checkpoint(checkpoint.url, storage_options=backend_url.storage_options)
    assert verify_checkpoint(checkpoint) == []


def test_a_file_of_the_wrong_size_makes_it_incomplete(make_checkpoint) -> None:
    checkpoint = make_checkpoint("checkpoint-1", {"model.safetensors": b"w" * 10, "a.pt": b"a"})
    checkpoint.write_bytes("model.safetensors", b"w" * 9)
    inspection = inspect_checkpoint(checkpoint)
    assert inspection.status is INCOMPLETE
    assert inspection.problems == [
        f"{checkpoint.url_of('model.safetensors')} has the wrong size: manifest lists 10 bytes, object has 9"
    ]
    assert not validate_checkpoint(checkpoint)
    assert verify_checkpoint(checkpoint) == inspection.problems


def test_a_missing_file_makes_it_incomplete(make_checkpoint) -> None:
    checkpoint = make_checkpoint("checkpoint-1")
    checkpoint.delete("optimizer_state.pt")
    assert checkpoint_status(checkpoint) is INCOMPLETE
    [problem] = verify_checkpoint(checkpoint)
    assert problem == f"{checkpoint.url_of('optimizer_state.pt')} is missing (manifest lists 32 bytes)"


def test_a_leftover_marker_beside_a_manifest_is_harmless(make_checkpoint) -> None:
    checkpoint = make_checkpoint("checkpoint-1")
    begin_checkpoint(checkpoint, checkpoint_id=1, world_size=1)
    assert IN_PROGRESS_NAME in checkpoint.walk()
    assert checkpoint_status(checkpoint) is COMPLETE


def test_files_not_in_the_manifest_do_not_matter(make_checkpoint) -> None:
    checkpoint = make_checkpoint("checkpoint-1")
    checkpoint.write_bytes("notes.txt", b"extra")
    assert checkpoint_status(checkpoint) is COMPLETE


def test_validity_reads_no_bytes_but_the_manifest(make_checkpoint) -> None:
    checkpoint = make_checkpoint("checkpoint-1", {f"f{i}.pt": b"x" * i for i in range(6)})
    counting = CountingStorage(checkpoint)
    assert checkpoint_status(counting) is COMPLETE
    assert counting.bytes_read == len(checkpoint.read_bytes(MANIFEST_NAME))


# -- the in-progress marker -----------------------------------------------------


def test_marker_without_manifest_is_incomplete_even_with_complete_weights(storage: Storage) -> None:
    _write_sharded_model(storage)
    assert checkpoint_status(storage) is COMPLETE  # a valid plain model directory...
    begin_checkpoint(storage, checkpoint_id=None, world_size=1)
    assert checkpoint_status(storage) is INCOMPLETE  # ...until a save of it is in progress
    assert not validate_checkpoint(storage)


# -- neither manifest nor marker: plain model directories -------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_single_weights_file_is_a_valid_model_directory(storage: Storage, name: str) -> None:
    storage.write_bytes(name, _shard(1.0))
    assert checkpoint_status(storage) is COMPLETE


def test_index_with_every_shard_is_complete(storage: Storage) -> None:
    _write_sharded_model(storage)
    assert checkpoint_status(storage) is COMPLETE
    assert verify_checkpoint(storage) == []  # no checksums to check without a manifest


def test_index_naming_a_missing_shard_is_incomplete(storage: Storage) -> None:
    _write_sharded_model(storage, skip="model-00002-of-00002.safetensors")
    inspection = inspect_checkpoint(storage)
    assert inspection.status is INCOMPLETE
    assert inspection.problems == [
        f"{storage.url_of('model-00002-of-00002.safetensors')} is missing (named by model.safetensors.index.json)"
    ]


@pytest.mark.parametrize("files", [{}, {"config.json": b"{}", "sub/notes.txt": b"x"}], ids=["empty", "no-weights"])
def test_without_weights_it_is_not_a_checkpoint(storage: Storage, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        storage.write_bytes(key, data)
    assert checkpoint_status(storage) is NOT_A_CHECKPOINT
    assert not validate_checkpoint(storage)


def test_missing_directory_is_not_valid_and_does_not_raise(backend_url) -> None:
    url = f"{backend_url.url}/does/not/exist"
    assert not validate_checkpoint(url, storage_options=backend_url.storage_options)
    assert not validate_checkpoint(url, storage_options=backend_url.storage_options, verify_checksums=True)


# -- malformed content ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        (MANIFEST_NAME, b'{"checkpoint_path": 5}'),
        ("model.safetensors.index.json", b"{broken"),
        ("pytorch_model.bin.index.json", json.dumps({"weight_map": {"w": "../../etc/passwd"}}).encode()),
    ],
    ids=["manifest", "index-syntax", "index-escapes"],
)
def test_malformed_commit_record_is_corrupt_names_the_url_and_changes_nothing(
    storage: Storage, caplog: pytest.LogCaptureFixture, key: str, raw: bytes
) -> None:
    storage.write_bytes("model-00001-of-00001.safetensors", _shard(0.0))
    storage.write_bytes(key, raw)
    before = {k: storage.read_bytes(k) for k in storage.walk()}
    with pytest.raises(CorruptCheckpointError, match=re.escape(storage.url_of(key))):
        checkpoint_status(storage)
    with caplog.at_level(logging.INFO, logger="ckptio.checkpoint.validate"):
        assert not validate_checkpoint(storage)
    assert storage.url_of(key) in caplog.text
    [problem] = verify_checkpoint(storage)
    assert storage.url_of(key) in problem
    assert {k: storage.read_bytes(k) for k in storage.walk()} == before


# -- checksums and copies ---------------------------------------------------------


def test_verify_catches_a_flipped_byte_of_the_same_size(make_checkpoint) -> None:
    checkpoint = make_checkpoint("checkpoint-1", {"model.safetensors": _shard(1.0), "o.pt": b"optimizer"})
    data = bytearray(checkpoint.read_bytes("model.safetensors"))
    data[-1] ^= 0x01
    checkpoint.write_bytes("model.safetensors", bytes(data))
    assert checkpoint_status(checkpoint) is COMPLETE  # sizes alone cannot see it
    assert validate_checkpoint(checkpoint)
    [problem] = verify_checkpoint(checkpoint)
    assert problem.startswith(f"{checkpoint.url_of('model.safetensors')} is corrupt: CRC32C expected ")
    assert not validate_checkpoint(checkpoint, verify_checksums=True)


def test_a_copied_checkpoint_stays_valid_on_another_prefix_and_backend(make_checkpoint, storage, tmp_path) -> None:
    checkpoint = make_checkpoint("checkpoint-4")
    targets = [storage.child("copy/elsewhere"), open_storage(str(tmp_path / "local-copy"))]
    for target in targets:
        assert checkpoint_status(target) is NOT_A_CHECKPOINT
        _copy_all(checkpoint, target)
        assert checkpoint_status(target) is COMPLETE
        assert verify_checkpoint(target) == []
