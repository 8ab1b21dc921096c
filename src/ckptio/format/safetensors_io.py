"""Stream safetensors shards to storage and read them back by mmap or byte ranges.

File layout (the safetensors format): an 8-byte little-endian header length
``N``, ``N`` bytes of JSON (``{"__metadata__": {...}, name: {"dtype", "shape",
"data_offsets": [begin, end]}}``, space-padded to a multiple of 8), then the
tensors' bytes back to back.

Writing never builds a shard in memory: the header is computed from shapes and
dtypes, then each tensor's own memory is written in slices of at most
:data:`WRITE_CHUNK` bytes (a non-contiguous or non-CPU tensor is copied to a
contiguous CPU block a few rows at a time, never whole). Reading maps a local file
(``mmap``, copy-on-write, no copy of the data) or, on object stores, fetches
the header and then only the byte ranges of the tensors asked for: adjacent
ranges are merged and big ones split, several are in flight at once, and each
is copied as it arrives into the tensor it belongs to (a module's own
parameter when the caller passes it in ``out``), so memory never holds the
shard's bytes twice. Every header is validated against the object's size before a
byte of tensor data is trusted.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckptio.errors import CorruptCheckpointError, InvalidArgumentError
from ckptio.format import strict_json
from ckptio.format.ranged_reads import RANGE_WORKERS, read_into
from ckptio.storage import Storage
from ckptio.storage.integrity import ChecksumWriter, FileRecord

__all__ = [
    "HeaderEntry",
    "SafetensorsHeader",
    "check_writable",
    "coalesce_ranges",
    "encode_header",
    "fills_in_place",
    "parse_header",
    "read_header",
    "read_safetensors",
    "tensor_chunks",
    "write_safetensors",
]

#: Largest slice handed to a storage writer at once (keeps upload buffers small).
WRITE_CHUNK = 8 * 2**20
#: Largest header accepted (the safetensors library's own limit).
MAX_HEADER_SIZE = 100_000_000
#: Bytes fetched speculatively from a remote shard to get its header in one request.
HEADER_PREFETCH = 32 * 1024
#: Largest single ranged read when coalescing tensor ranges.
MAX_RANGE = 64 * 2**20

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
#: safetensors dtype name -> torch dtype, for the dtypes this torch has.
DTYPES: dict[str, torch.dtype] = {
    st: getattr(torch, attr) for st, attr in _DTYPE_NAMES.items() if isinstance(getattr(torch, attr, None), torch.dtype)
}
_NAME_OF: dict[torch.dtype, str] = {dtype: st for st, dtype in DTYPES.items()}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a shard; ``start``/``end`` are absolute byte offsets in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated shard header: tensors by name, ``__metadata__``, and where data starts."""

    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int


def check_writable(name: str, tensor: torch.Tensor, url: str) -> None:
    """Raise InvalidArgumentError unless safetensors can hold ``tensor``."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise InvalidArgumentError(
            f"cannot write {name!r} to {url!r}: safetensors holds plain tensors only, got "
            f"{type(tensor).__module__}.{type(tensor).__qualname__}; save with safetensors=False "
            "(PyTorch .bin) for tensor subclasses such as torchao quantized weights"
        )
    if tensor.device.type == "meta":
        raise InvalidArgumentError(f"cannot write {name!r} to {url!r}: it is a meta tensor with no data")
    if tensor.dtype not in _NAME_OF:
        raise InvalidArgumentError(
            f"cannot write {name!r} to {url!r}: dtype {tensor.dtype} has no safetensors equivalent"
        )


def encode_header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """Header bytes (length prefix included) and the order the tensors' data follows in.

    Tensors are laid out by decreasing element size (stable), so every tensor
    starts at an offset aligned to its element size and local loads can map
    it without a copy.
    """
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = int(tensor.numel()) * tensor.element_size()
        header[name] = {
            "dtype": _NAME_OF[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data.cast("B")


def tensor_chunks(tensor: torch.Tensor, chunk_size: int = WRITE_CHUNK) -> Iterator[memoryview]:
    """Yield a tensor's bytes in C order, in slices of at most about ``chunk_size``.

    A contiguous CPU tensor is sliced from its own memory. Any other tensor
    (non-contiguous, conjugated, on an accelerator) is copied a block of rows
    at a time, so the extra memory is one chunk, never the whole tensor.
    """
    tensor = tensor.detach()
    if tensor.numel() == 0:
        return
    plain = tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()
    if plain or tensor.dim() == 0:
        pieces: Iterable[torch.Tensor] = [tensor]
    else:
        row_bytes = max(1, tensor[0].numel() * tensor.element_size())
        rows = max(1, chunk_size // row_bytes)
        pieces = (tensor[i : i + rows] for i in range(0, tensor.shape[0], rows))
    for piece in pieces:
        if not plain:
            piece = piece.to("cpu").resolve_conj().resolve_neg().contiguous()
        data = _bytes_of(piece)
        for start in range(0, data.nbytes, chunk_size):
            yield data[start : start + chunk_size]


def write_safetensors(
    storage: Storage, key: str, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None
) -> FileRecord:
    """Stream ``tensors`` into the safetensors object ``key``; publish it only when complete.

    Peak extra memory is one write slice (a copied block of rows when a tensor
    is non-contiguous or not on the CPU), never a tensor or the shard.

    Raises:
        InvalidArgumentError: a tensor is a subclass, a meta tensor, or of a dtype
            safetensors lacks; nothing is written then.
    """
    url = storage.url_of(key)
    for name, tensor in tensors.items():
        check_writable(name, tensor, url)
    header, order = encode_header(tensors, metadata)
    writer = ChecksumWriter(storage.open_writer(key), key)
    with writer:
        writer.write(header)
        for name in order:
            for chunk in tensor_chunks(tensors[name]):
                writer.write(chunk)
    if writer.record is None:  # pragma: no cover - commit always sets it
        raise RuntimeError(f"writer for {url!r} committed without a record")
    return writer.record


def _corrupt(url: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"cannot read safetensors shard {url!r}: {what}; the file was not modified")


def _header_length(prefix: bytes, object_size: int, url: str) -> int:
    if object_size < 8 or len(prefix) < 8:
        raise _corrupt(url, f"object has {object_size} bytes, fewer than the 8-byte header length (truncated)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_SIZE:
        raise _corrupt(url, f"header length {length} exceeds {MAX_HEADER_SIZE} bytes (not a safetensors file?)")
    if 8 + length > object_size:
        raise _corrupt(
            url, f"header declares {length} bytes, object has only {object_size - 8} after the length (truncated)"
        )
    return int(length)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(name: str, raw: object, data_start: int, url: str) -> HeaderEntry:
    if not isinstance(raw, dict):
        raise _corrupt(url, f"entry {name!r} is not an object")
    dtype_name = raw.get("dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    shape = raw.get("shape")
    offsets = raw.get("data_offsets")
    if dtype is None:
        raise _corrupt(url, f"tensor {name!r} has unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _corrupt(url, f"tensor {name!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(url, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for dim in shape:
        numel *= dim
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != expected:
        raise _corrupt(
            url,
            f"tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes, offsets span {offsets[1] - offsets[0]}",
        )
    return HeaderEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_layout(entries: Mapping[str, HeaderEntry], data_start: int, url: str) -> int:
    """Return where the data ends; raise unless the tensors tile the data section without overlap or hole."""
    position = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start < position:
            raise _corrupt(url, f"tensor {name!r} (data_offsets from {entry.start - data_start}) overlaps another tensor")
        if entry.start > position:
            raise _corrupt(
                url, f"tensor {name!r} starts at data offset {entry.start - data_start}, leaving a hole after "
                f"{position - data_start}"
            )
        position = entry.end
    return position


def _metadata(raw: object, url: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise _corrupt(url, "__metadata__ is not an object of strings")
    return dict(raw)


def parse_header(prefix: bytes, object_size: int, url: str) -> SafetensorsHeader:
    """Validate a shard header (``prefix`` holds at least its first ``8 + N`` bytes).

    Raises:
        CorruptCheckpointError: bad length or JSON (a duplicate name included), unknown
            dtype, offsets that overlap, leave holes or disagree with dtype and shape, or
            an object whose size differs from what the header declares.
    """
    length = _header_length(prefix, object_size, url)
    if len(prefix) < 8 + length:
        raise _corrupt(url, f"header needs {8 + length} bytes, got {len(prefix)}")
    try:
        raw = strict_json.loads(prefix[8 : 8 + length])
    except ValueError as exc:
        raise _corrupt(url, f"header is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise _corrupt(url, "header is not a JSON object")
    metadata = _metadata(raw.pop("__metadata__", None), url)
    data_start = 8 + length
    entries = {name: _parse_entry(name, value, data_start, url) for name, value in raw.items()}
    data_end = _check_layout(entries, data_start, url)
    if data_end != object_size:
        state = "truncated" if object_size < data_end else "has trailing bytes"
        raise _corrupt(
            url,
            f"header declares {data_end - data_start} data bytes ({data_end} in all), object has {object_size}; {state}",
        )
    return SafetensorsHeader(entries, metadata, data_start)


def read_header(storage: Storage, key: str) -> SafetensorsHeader:
    """Fetch and validate a shard's header with ranged reads (one, usually two at most)."""
    url = storage.url_of(key)
    size = storage.size(key)
    prefix = storage.read_bytes(key, 0, min(size, HEADER_PREFETCH))
    length = _header_length(prefix, size, url)
    if 8 + length > len(prefix):
        prefix += storage.read_bytes(key, len(prefix), 8 + length)
    return parse_header(prefix, size, url)


def coalesce_ranges(
    ranges: Sequence[tuple[int, int]], *, max_gap: int = 0, max_size: int = MAX_RANGE
) -> list[tuple[int, int]]:
    """Merge sorted-or-not ``[start, end)`` ranges that touch (or lie ``max_gap`` apart).

    A merged range never grows past ``max_size`` unless a single input range is
    larger, so large reads still run as several concurrent requests.
    """
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start - merged[-1][1] <= max_gap and max(end, merged[-1][1]) - merged[-1][0] <= max_size:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _select(header: SafetensorsHeader, names: Iterable[str] | None, url: str) -> dict[str, HeaderEntry]:
    if names is None:
        return dict(header.entries)
    wanted = list(names)
    absent = [n for n in wanted if n not in header.entries]
    if absent:
        raise CorruptCheckpointError(f"shard {url!r} does not hold {absent} although the index says it does")
    return {n: header.entries[n] for n in wanted}


def _from_buffer(buffer: Any, entry: HeaderEntry) -> torch.Tensor:
    if entry.end == entry.start:
        return torch.empty(entry.shape, dtype=entry.dtype)
    itemsize = torch.empty((), dtype=entry.dtype).element_size()
    count = (entry.end - entry.start) // itemsize
    return torch.frombuffer(buffer, dtype=entry.dtype, count=count, offset=entry.start).reshape(entry.shape)


def fills_in_place(target: torch.Tensor, entry: HeaderEntry) -> bool:
    """Whether ``entry``'s bytes can be copied straight into ``target``'s memory.

    True for a plain, contiguous CPU tensor (or Parameter) of the entry's dtype and
    shape, not conjugated or negated, not an inference tensor: exactly the
    tensors ``copy_`` would fill with the same bytes.
    """
    return (
        type(target) in (torch.Tensor, torch.nn.Parameter)
        and target.device.type == "cpu"
        and target.dtype == entry.dtype
        and tuple(target.shape) == entry.shape
        and target.is_contiguous()
        and not target.is_conj()
        and not target.is_neg()
        and not target.is_inference()
    )


def _read_local(path: str, key: str, url: str, names: Iterable[str] | None) -> dict[str, torch.Tensor]:
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < 8:
            raise _corrupt(url, f"object has {size} bytes, fewer than the 8-byte header length (truncated)")
        # Copy-on-write mapping: tensors share the page cache, and writing to a
        # loaded tensor never touches the file.
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    length = _header_length(mapped[:8], size, url)
    header = parse_header(mapped[: 8 + length], size, url)
    return {name: _from_buffer(mapped, entry) for name, entry in _select(header, names, url).items()}


def _read_remote(
    storage: Storage,
    key: str,
    url: str,
    names: Iterable[str] | None,
    header: SafetensorsHeader | None,
    out: Mapping[str, torch.Tensor],
    range_size: int | None,
    workers: int,
) -> dict[str, torch.Tensor]:
    header = header or read_header(storage, key)
    result: dict[str, torch.Tensor] = {}
    placements: list[tuple[int, memoryview]] = []
    for name, entry in _select(header, names, url).items():
        target = out.get(name)
        if target is None or not fills_in_place(target, entry):
            target = torch.empty(entry.shape, dtype=entry.dtype)
        result[name] = target
        if entry.end > entry.start:
            placements.append((entry.start, _bytes_of(target)))
    # Every byte goes from the network buffer straight into its tensor, a few ranges at a time.
    read_into(storage, key, placements, range_size=range_size, workers=workers)
    return result


def read_safetensors(
    storage: Storage,
    key: str,
    names: Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    header: SafetensorsHeader | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
    range_size: int | None = None,
    workers: int = RANGE_WORKERS,
) -> dict[str, torch.Tensor]:
    """Read tensors ``names`` (all when None) of a shard, placed on ``device``.

    Local files are memory-mapped (no copy); other storages fetch the header
    (unless ``header``, from :func:`read_header`, is given) and then only the
    needed byte ranges in reads of about ``range_size`` bytes (default
    :data:`~ckptio.format.ranged_reads.READ_RANGE_SIZE`), up to ``workers`` at
    once where the backend overlaps requests, each copied into its tensor as
    it arrives.

    Args:
        out: tensors to fill in place, by name, when the shard is not a local
            file. Each one that :func:`fills_in_place` accepts for its entry
            receives the bytes directly, from the network buffer with no
            intermediate copy (the returned dict holds that very tensor, never
            moved to ``device``: test with ``is``); the others get fresh
            tensors as without ``out``. A local file is mapped instead and
            ``out`` is left alone. If a read fails part way, tensors of ``out``
            may hold part of the new data.

    Raises:
        ObjectNotFoundError: the shard does not exist.
        CorruptCheckpointError: the shard is truncated, malformed, or lacks a name.
    """
    url = storage.url_of(key)
    path = storage.local_path(key)
    fill = out or {}
    if path is not None and os.path.isfile(path):
        tensors = _read_local(path, key, url, names)  # mapped, not copied: ``out`` is not filled
    else:
        tensors = _read_remote(storage, key, url, names, header, fill, range_size, workers)
    if torch.device(device).type != "cpu":
        tensors = {n: t if fill.get(n) is t else t.to(device) for n, t in tensors.items()}
    return tensors
