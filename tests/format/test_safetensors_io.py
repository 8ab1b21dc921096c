"""The streaming safetensors writer and the mmap / ranged reader, checked against the safetensors library."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch

from ckptio.errors import CorruptCheckpointError, InvalidArgumentError
from ckptio.format.safetensors_io import (
    coalesce_ranges,
    encode_header,
    parse_header,
    read_header,
    read_safetensors,
    tensor_chunks,
    write_safetensors,
)
from ckptio.storage import Storage
from ckptio.storage.integrity import checksum_object


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.randn(4, 4),
        "flag": torch.tensor([True, False, True]),
        "i64": torch.arange(7),
        "nc": torch.randn(6, 4).t(),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_we_write_safetensors_reads(storage: Storage) -> None:
    tensors = _tensors()
    record = write_safetensors(storage, "x.safetensors", tensors, metadata={"format": "pt"})
    data = storage.read_bytes("x.safetensors")
    _assert_same(safetensors.torch.load(data), tensors)
    assert record == checksum_object(storage, "x.safetensors")
    header_len = struct.unpack("<Q", data[:8])[0]
    assert header_len % 8 == 0
    assert json.loads(data[8 : 8 + header_len])["__metadata__"] == {"format": "pt"}


def test_safetensors_writes_we_read(storage: Storage) -> None:
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    storage.write_bytes("lib.safetensors", safetensors.torch.save(tensors, metadata={"format": "pt"}))
    _assert_same(read_safetensors(storage, "lib.safetensors"), tensors)
    assert read_header(storage, "lib.safetensors").metadata == {"format": "pt"}
    some = read_safetensors(storage, "lib.safetensors", ["flag", "empty"])
    _assert_same(some, {"flag": tensors["flag"], "empty": tensors["empty"]})


def test_local_reads_are_copy_on_write_maps_of_the_file(tmp_path: object) -> None:
    from ckptio.storage import open_storage

    storage = open_storage(str(tmp_path))
    write_safetensors(storage, "x.safetensors", {"w": torch.arange(1024, dtype=torch.float32)})
    loaded = read_safetensors(storage, "x.safetensors")["w"]
    assert torch.equal(loaded, torch.arange(1024, dtype=torch.float32))
    loaded.add_(1)  # copy-on-write: the file keeps its bytes
    assert torch.equal(read_safetensors(storage, "x.safetensors")["w"], torch.arange(1024, dtype=torch.float32))


def test_tensors_are_laid_out_aligned_by_element_size() -> None:
    header, order = encode_header(
        {"u8": torch.zeros(3, dtype=torch.uint8), "f64": torch.zeros(2, dtype=torch.float64), "f32": torch.zeros(1)}
    )
    assert order == ["f64", "f32", "u8"]
    assert (len(header) - 8) % 8 == 0


def test_subclasses_and_meta_tensors_are_refused_before_writing(storage: Storage) -> None:
    with pytest.raises(InvalidArgumentError, match="meta tensor"):
        write_safetensors(storage, "m.safetensors", {"w": torch.empty(3, device="meta")})
    assert not storage.exists("m.safetensors")


@pytest.mark.parametrize("cut", [4, 20, 60], ids=["in-length", "in-header", "in-data"])
def test_truncated_shard_names_url_and_sizes(storage: Storage, cut: int) -> None:
    data = safetensors.torch.save({"w": torch.arange(16, dtype=torch.float32)})
    storage.write_bytes("t.safetensors", data[: len(data) - cut] if cut == 60 else data[:cut])
    with pytest.raises(CorruptCheckpointError, match="t.safetensors") as info:
        read_safetensors(storage, "t.safetensors")
    assert "truncated" in str(info.value)
    assert storage.read_bytes("t.safetensors") == (data[: len(data) - cut] if cut == 60 else data[:cut])


def _header_bytes(header: object) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    ("header", "data_len", "match"),
    [
        ("not json", 0, "not valid JSON"),
        ([1, 2], 0, "not a JSON object"),
        ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "needs 8 bytes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, 4, "invalid data_offsets"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 12, "trailing bytes"),
    ],
    ids=["json", "array", "dtype", "shape", "size", "offsets", "trailing"],
)
def test_malformed_headers_are_refused(header: object, data_len: int, match: str) -> None:
    prefix = _header_bytes(header) if not isinstance(header, str) else struct.pack("<Q", 8) + b"not json"
    with pytest.raises(CorruptCheckpointError, match=match):
        parse_header(prefix, len(prefix) + data_len, "s3://b/x.safetensors")


def test_absurd_header_length_is_refused() -> None:
    with pytest.raises(CorruptCheckpointError, match="header length"):
        parse_header(struct.pack("<Q", 2**40), 2**41, "s3://b/x.safetensors")


def test_asking_for_a_name_the_shard_lacks_is_corrupt(storage: Storage) -> None:
    write_safetensors(storage, "x.safetensors", {"w": torch.ones(2)})
    with pytest.raises(CorruptCheckpointError, match="does not hold"):
        read_safetensors(storage, "x.safetensors", ["v"])


def test_coalesce_merges_touching_ranges_and_caps_size() -> None:
    assert coalesce_ranges([(10, 20), (0, 10), (30, 40), (20, 25), (5, 5)]) == [(0, 25), (30, 40)]
    assert coalesce_ranges([(0, 10), (12, 20)], max_gap=2) == [(0, 20)]
    assert coalesce_ranges([(0, 10), (10, 20), (20, 30)], max_size=20) == [(0, 20), (20, 30)]
    assert coalesce_ranges([]) == []


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(1000.0),
        torch.arange(1000.0).reshape(20, 50).t(),
        torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1),
        torch.tensor(5.0),
        torch.arange(60.0).reshape(3, 20)[:, ::3],
        (torch.arange(12.0) + 1j * torch.arange(12.0)).to(torch.complex64).conj(),
    ],
    ids=["contiguous", "transposed", "permuted", "0-d", "strided", "conjugated"],
)
def test_tensor_chunks_are_the_c_order_bytes_in_bounded_pieces(tensor: torch.Tensor) -> None:
    chunks = list(tensor_chunks(tensor, chunk_size=64))
    expected = tensor.resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert b"".join(bytes(c) for c in chunks) == expected
    row = tensor[0].numel() * tensor.element_size() if tensor.dim() else 0
    assert max(c.nbytes for c in chunks) <= max(64, row)
