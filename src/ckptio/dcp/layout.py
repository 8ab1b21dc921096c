"""Names, records and byte geometry of a DCP checkpoint written by ckptio (pure: no I/O).

A data file is the raw, row-major bytes of its items one after another (a
tensor chunk as ``numel * itemsize`` bytes, a non-tensor value as the bytes
DCP's planner pickled), so any sub-box of a stored chunk maps to one byte
span of its file (:func:`box_span`): a reader fetches that span, never the
whole file.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import Metadata

from ckptio.checkpoint.layout import DCP_METADATA_NAME
from ckptio.errors import CorruptCheckpointError, InvalidArgumentError
from ckptio.storage import Storage, split_url
from ckptio.storage.integrity import FileRecord

__all__ = [
    "FORMAT_NAME",
    "METADATA_NAME",
    "BoxSpan",
    "ItemLocation",
    "RankAssignment",
    "WrittenItem",
    "box_span",
    "data_file_name",
    "decode_metadata",
    "encode_metadata",
    "is_checkpoint_location",
    "raw_bytes",
]

#: DCP's metadata object (pickled ``Metadata``), written by the coordinator after every data file.
METADATA_NAME = DCP_METADATA_NAME
#: ``metadata["format"]`` of the ckptio manifest of a DCP checkpoint.
FORMAT_NAME = "torch.distributed.checkpoint"


def data_file_name(rank: int, part: int) -> str:
    """The name of data file ``part`` of ``rank``: ``rank00001-part002.distcp``."""
    return f"rank{rank:05d}-part{part:03d}.distcp"


@dataclass(frozen=True)
class ItemLocation:
    """Where one item's bytes are: ``[offset, offset + length)`` of data file ``file``.

    Stored as ``Metadata.storage_data[index]`` for every item of the checkpoint.
    """

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class WrittenItem:
    """``WriteResult.storage_data``: the item's location and the record of the file holding it.

    The records travel to the coordinator with DCP's own gather of write
    results, so the manifest lists every rank's files without another collective.
    """

    location: ItemLocation
    file: FileRecord


@dataclass(frozen=True)
class RankAssignment:
    """``SavePlan.storage_data`` set by the coordinator: which rank of how many a plan is."""

    rank: int
    world_size: int


@dataclass(frozen=True)
class BoxSpan:
    """A sub-box of a row-major chunk as a byte span of the chunk.

    Attributes:
        start: byte offset of the box's first element in the chunk.
        end: one past the byte offset of its last element (``start == end`` when empty).
        strides: element strides of the chunk, to view the span as the box.
        contiguous: whether the span holds the box's elements and nothing else.
    """

    start: int
    end: int
    strides: tuple[int, ...]
    contiguous: bool


def box_span(chunk: Sequence[int], offsets: Sequence[int], lengths: Sequence[int], itemsize: int) -> BoxSpan:
    """The bytes of the box ``offsets + [0, lengths)`` inside a row-major chunk of shape ``chunk``.

    Raises:
        CorruptCheckpointError: the box does not fit in the chunk.
    """
    if not len(chunk) == len(offsets) == len(lengths) or any(
        o < 0 or n < 0 or o + n > c for c, o, n in zip(chunk, offsets, lengths, strict=True)
    ):
        raise CorruptCheckpointError(
            f"read of box {list(offsets)}+{list(lengths)} does not fit in a stored chunk of shape {list(chunk)}"
        )
    strides = tuple(math.prod(chunk[d + 1 :]) for d in range(len(chunk)))
    numel = math.prod(lengths)
    if numel == 0:
        return BoxSpan(0, 0, strides, True)
    first = sum(o * s for o, s in zip(offsets, strides, strict=True))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides, strict=True))
    return BoxSpan(first * itemsize, (last + 1) * itemsize, strides, last - first + 1 == numel)


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (row-major), writable, without a copy."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data.cast("B")


def encode_metadata(metadata: Metadata) -> bytes:
    """DCP's metadata object as bytes (a pickle, as DCP's own writers store it)."""
    return pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)


def decode_metadata(blob: bytes, url: str) -> Metadata:
    """The metadata object back from :func:`encode_metadata`.

    Raises:
        CorruptCheckpointError: not a pickled ``Metadata``; names ``url``.
    """
    try:
        metadata = pickle.loads(blob)  # noqa: S301 - DCP's metadata is a pickle by design
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad object
        raise CorruptCheckpointError(
            f"cannot read DCP metadata {url!r}: {exc}; nothing was loaded and the checkpoint was not modified"
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(
            f"cannot read DCP metadata {url!r}: it holds a {type(metadata).__name__}, not a DCP Metadata; "
            "nothing was loaded and the checkpoint was not modified"
        )
    return metadata


def is_checkpoint_location(checkpoint_id: object) -> bool:
    """Whether ``checkpoint_id`` names a place ckptio can open: a Storage, a local path, or a URL
    whose protocol fsspec knows (nothing is contacted)."""
    if isinstance(checkpoint_id, Storage):
        return True
    if not isinstance(checkpoint_id, str | os.PathLike):
        return False
    location = os.fspath(checkpoint_id)
    if not isinstance(location, str) or not location:
        return False
    try:
        protocol, _ = split_url(location)
    except InvalidArgumentError:
        return False
    if protocol in ("file", "local"):
        return True
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return False
    return True
