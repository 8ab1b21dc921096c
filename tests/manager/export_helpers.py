"""Helpers of the export tests: hand-made sharded (DCP) checkpoints, bitwise comparison (not collected)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from ckptio.checkpoint import (
    CheckpointManifest,
    begin_checkpoint,
    commit_checkpoint,
    utc_timestamp,
)
from ckptio.dcp.layout import (
    FORMAT_NAME,
    METADATA_NAME,
    ItemLocation,
    data_file_name,
    encode_metadata,
)
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord, checksum_bytes

Box = tuple[tuple[int, ...], tuple[int, ...]]


def write_sharded_checkpoint(
    storage: Storage,
    tensors: Mapping[str, tuple[torch.Tensor, Sequence[Box]]],
    *,
    extra_bytes: Mapping[str, bytes] | None = None,
    files: int = 2,
    commit: bool = True,
) -> None:
    """A checkpoint laid out as the manager writes sharded state: DCP data files, metadata, manifest.

    ``tensors`` maps a DCP key (``model.<name>``, ``optimizer.<...>``) to the full
    tensor and the boxes ``(offsets, sizes)`` it is stored as; chunk ``i`` of every
    tensor goes to data file ``i % files``, as rank ``i`` would write it.
    Without ``commit`` the save is left as a crash leaves it: marker, no manifest.
    """
    begin_checkpoint(storage, checkpoint_id=1, world_size=files)
    blobs = [bytearray() for _ in range(files)]
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    locations: dict[MetadataIndex, ItemLocation] = {}
    for fqn, (full, boxes) in tensors.items():
        chunks = []
        for i, (offsets, sizes) in enumerate(boxes):
            piece = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))].contiguous()
            data = piece.reshape(-1).view(torch.uint8).numpy().tobytes()
            blob = blobs[i % files]
            locations[MetadataIndex(fqn, torch.Size(offsets))] = ItemLocation(
                data_file_name(i % files, 0), len(blob), len(data)
            )
            blob += data
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        state[fqn] = TensorStorageMetadata(TensorProperties(dtype=full.dtype), full.shape, chunks)
    for fqn, data in (extra_bytes or {}).items():
        state[fqn] = BytesStorageMetadata()
        locations[MetadataIndex(fqn)] = ItemLocation(data_file_name(0, 0), len(blobs[0]), len(data))
        blobs[0] += data
    records = []
    for rank, blob in enumerate(blobs):
        storage.write_bytes(data_file_name(rank, 0), blob)
        records.append(FileRecord(data_file_name(rank, 0), len(blob), checksum_bytes(blob)))
    metadata = encode_metadata(Metadata(state_dict_metadata=state, storage_data=locations))
    storage.write_bytes(METADATA_NAME, metadata)
    records.append(FileRecord(METADATA_NAME, len(metadata), checksum_bytes(metadata)))
    if commit:
        manifest = CheckpointManifest(
            checkpoint_path=".",
            world_size=files,
            timestamp=utc_timestamp(),
            files=records,
            metadata={"sharded_state": {"format": FORMAT_NAME, "optimizers": ["optimizer"]}},
        )
        commit_checkpoint(storage, manifest)


def halves(shape: Sequence[int], dim: int) -> list[Box]:
    """Two boxes splitting ``shape`` along ``dim`` (the first one bigger when it is odd)."""
    first = (shape[dim] + 1) // 2
    offsets_a = tuple(0 for _ in shape)
    sizes_a = tuple(first if d == dim else n for d, n in enumerate(shape))
    offsets_b = tuple(first if d == dim else 0 for d in range(len(shape)))
    sizes_b = tuple(n - first if d == dim else n for d, n in enumerate(shape))
    return [(offsets_a, sizes_a), (offsets_b, sizes_b)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(as_bytes[0], as_bytes[1])


def differing(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (or missing on one side)."""
    names = sorted(set(expected) | set(got))
    return [n for n in names if n not in expected or n not in got or not same_bits(expected[n], got[n])]


def load_exported(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported local directory, each shard opened with ``safetensors.torch.load_file``."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        loaded = load_file(str(shard))
        assert not set(loaded) & set(tensors), shard
        tensors.update(loaded)
    return tensors
