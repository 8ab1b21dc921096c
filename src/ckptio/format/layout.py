"""Which files hold a model directory's weights: detect the layout, find stale files.

A model directory holds either an index plus the shards it names, or one
weights file. When several are present (a crash between publishing a new
index and removing the old files), the safetensors index wins, then the
PyTorch index, then ``model.safetensors``, then ``pytorch_model.bin``, as
transformers decides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckptio.format.constants import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SHARD_NAME_PATTERN,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from ckptio.format.index import index_shard_files, read_index
from ckptio.storage import Storage, resolve_storage

__all__ = ["CheckpointMeta", "detect_layout", "get_checkpoint_metadata", "stale_weight_files", "weight_files"]

#: Candidates in order of preference: (file name, is_index, safetensors).
_CANDIDATES = (
    (SAFE_WEIGHTS_INDEX_NAME, True, True),
    (WEIGHTS_INDEX_NAME, True, False),
    (SAFE_WEIGHTS_NAME, False, True),
    (WEIGHTS_NAME, False, False),
)
_WEIGHT_FILE_NAMES = frozenset(name for name, _, _ in _CANDIDATES)


@dataclass(frozen=True)
class CheckpointMeta:
    """How a model directory stores its weights."""

    file_name: str  #: the index file if one exists, else the weights file
    is_index: bool
    safetensors: bool


def detect_layout(storage: Storage) -> CheckpointMeta | None:
    """The layout of the weights at the root of ``storage`` (one listing), or None."""
    present = set(storage.list(""))
    for name, is_index, safetensors in _CANDIDATES:
        if name in present:
            return CheckpointMeta(file_name=name, is_index=is_index, safetensors=safetensors)
    return None


def get_checkpoint_metadata(
    model_dir: str | os.PathLike[str] | Storage, *, storage_options: dict[str, Any] | None = None
) -> CheckpointMeta | None:
    """Describe how ``model_dir`` stores its weights; None when it holds no weights or index file."""
    return detect_layout(resolve_storage(model_dir, storage_options))


def weight_files(storage: Storage) -> list[str] | None:
    """The files the weights at the root of ``storage`` consist of, or None when there are none.

    An index comes first, followed by the shards it names (whether or not they
    exist: checking that is the caller's job).

    Raises:
        CorruptCheckpointError: the index is malformed or names files outside the directory.
    """
    meta = detect_layout(storage)
    if meta is None:
        return None
    if not meta.is_index:
        return [meta.file_name]
    return [meta.file_name, *index_shard_files(read_index(storage, meta.file_name))]


def is_weight_file_name(name: str) -> bool:
    """Whether ``name`` is a Hugging Face weights, index or shard file name."""
    return name in _WEIGHT_FILE_NAMES or SHARD_NAME_PATTERN.match(name) is not None


def stale_weight_files(present: Iterable[str], keep: Iterable[str]) -> list[str]:
    """Weight, index and shard files among ``present`` that are not in ``keep``. Pure."""
    kept = set(keep)
    return sorted(name for name in present if name not in kept and is_weight_file_name(name))
