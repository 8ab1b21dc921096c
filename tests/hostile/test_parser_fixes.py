"""Unit tests of the fixes the hostile corpus called for, one per bug."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ckptio.checkpoint.manifest import CheckpointManifest
from ckptio.errors import (
    CkptioError,
    CorruptCheckpointError,
    StateDictMismatchError,
    StoragePermissionError,
)
from ckptio.format import load_checkpoint, save_checkpoint
from ckptio.format.index import parse_index
from ckptio.format.safetensors_io import parse_header
from ckptio.storage import open_storage

URL = "memory://bucket/ckpt/model.safetensors"
SHARD = "model-00001-of-00001.safetensors"


def _shard(header: dict[str, Any] | bytes, data_size: int) -> tuple[bytes, int]:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + data_size


def _entry(begin: int, end: int, shape: list[Any] | None = None) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape or [(end - begin) // 4], "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "size", "problem"),
    [
        ({"a": _entry(0, 16), "b": _entry(8, 24)}, 24, "overlaps"),
        ({"a": _entry(0, 16), "b": _entry(24, 40)}, 40, "hole"),
        ({"a": _entry(8, 24)}, 24, "hole"),
        ({"a": _entry(0, 16, [True, 4])}, 16, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, 4, "invalid data_offsets"),
        ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype"),
        ({"__metadata__": {"format": 1}}, 0, "__metadata__"),
        ({"__metadata__": []}, 0, "__metadata__"),
    ],
    ids=["overlap", "hole", "hole-at-start", "bool-in-shape", "bool-offsets", "dtype-a-list", "metadata-int", "metadata-list"],
)
def test_header_layout_and_types_are_checked(header: dict[str, Any], size: int, problem: str) -> None:
    prefix, object_size = _shard(header, size)
    with pytest.raises(CorruptCheckpointError, match=problem) as caught:
        parse_header(prefix, object_size, URL)
    assert URL in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
         b'"data_offsets": [4, 8]}}', "more than once"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"x": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
    ids=["duplicate-tensor", "deep-nesting", "huge-integer"],
)
def test_header_json_is_strict(raw: bytes, problem: str) -> None:
    prefix, object_size = _shard(raw, 8)
    with pytest.raises(CorruptCheckpointError, match=problem):
        parse_header(prefix, object_size, URL)


def test_header_accepts_tensors_that_tile_the_data_including_empty_ones() -> None:
    header = {"a": _entry(0, 16), "empty": _entry(16, 16, [0]), "b": _entry(16, 24)}
    prefix, object_size = _shard(header, 24)
    parsed = parse_header(prefix, object_size, URL)
    assert sorted(parsed.entries) == ["a", "b", "empty"]


@pytest.mark.parametrize(
    "raw",
    [b'{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}', b"[" * 100_000, b'{"weight_map": ' + b"1" * 5000 + b"}"],
    ids=["key-in-two-files", "deep-nesting", "huge-integer"],
)
def test_index_json_is_strict(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="cannot parse index 'memory://i.json'"):
        parse_index(raw, "memory://i.json")


@pytest.mark.parametrize(
    "raw",
    [b'{"files": [], "files": []}', b"[" * 100_000, b'{"world_size": ' + b"1" * 5000 + b"}"],
    ids=["duplicate-key", "deep-nesting", "huge-integer"],
)
def test_manifest_json_is_strict(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="cannot read manifest 'memory://m.json'"):
        CheckpointManifest.from_json(raw, url="memory://m.json")


def test_shape_mismatch_names_the_shard(tmp_path: Path) -> None:
    save_checkpoint(str(tmp_path), nn.Linear(4, 3), safetensors=True)
    with pytest.raises(StateDictMismatchError, match=r"checkpoint shape \[3, 4\], module \[4, 3\] \(in .*model-00001-of-00001\.safetensors\)"):
        load_checkpoint(str(tmp_path), nn.Linear(3, 4))


def _linked_checkpoint(tmp_path: Path, target: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(str(ckpt), nn.Linear(2, 2), safetensors=True)
    (ckpt / SHARD).unlink()
    os.symlink(target, ckpt / SHARD)
    return ckpt


def test_local_reads_refuse_a_symlink_leading_outside(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    save_checkpoint(str(planted), {"weight": torch.full((2, 2), 7.0), "bias": torch.full((2,), 7.0)}, safetensors=True)
    ckpt = _linked_checkpoint(tmp_path, planted / SHARD)
    storage = open_storage(str(ckpt))
    url = storage.url_of(SHARD)
    assert storage.local_path(SHARD) is None
    for read in (lambda: storage.read_bytes(SHARD), lambda: storage.info(SHARD)):
        with pytest.raises(StoragePermissionError, match="symbolic link") as caught:
            read()
        assert url in str(caught.value) and caught.value.__cause__ is not caught.value
    model = nn.Linear(2, 2)
    with pytest.raises(CkptioError, match="symbolic link"):
        load_checkpoint(str(ckpt), model)
    assert not torch.equal(model.weight.detach(), torch.full((2, 2), 7.0))


def test_local_reads_follow_a_symlink_that_stays_inside(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    model = nn.Linear(2, 2)
    save_checkpoint(str(ckpt), model, safetensors=True)
    (ckpt / SHARD).rename(ckpt / "real.bin")
    os.symlink("real.bin", ckpt / SHARD)
    loaded = load_checkpoint(str(ckpt))
    assert loaded is not None and torch.equal(loaded["weight"], model.weight.detach())


def test_follow_symlinks_reads_a_hub_cache_snapshot(tmp_path: Path) -> None:
    """A Hugging Face hub cache snapshot links each file to ``../../blobs``: readable when asked for."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    model = nn.Linear(2, 2)
    save_checkpoint(str(blobs), model, safetensors=True)
    snapshot.mkdir(parents=True)
    for name in os.listdir(blobs):
        os.symlink(os.path.join("..", "..", "blobs", name), snapshot / name)
    with pytest.raises(CkptioError, match="follow_symlinks=True"):
        load_checkpoint(str(snapshot))
    loaded = load_checkpoint(str(snapshot), storage_options={"follow_symlinks": True})
    assert loaded is not None and torch.equal(loaded["weight"], model.weight.detach())
