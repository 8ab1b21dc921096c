"""Hugging Face file names and index schema, exactly as transformers writes them."""

from __future__ import annotations

import re

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "SHARD_NAME_PATTERN",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "index_name_for",
    "shard_file_name",
    "weights_name_for",
]

WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

#: ``model-00001-of-00003.safetensors`` / ``pytorch_model-00001-of-00003.bin``.
SHARD_NAME_PATTERN = re.compile(r"^(model|pytorch_model)-(\d{5})-of-(\d{5})\.(safetensors|bin)$")

#: Metadata written into every safetensors shard, as transformers does.
SAFETENSORS_METADATA = {"format": "pt"}


def weights_name_for(safetensors: bool) -> str:
    """The single-file weights name of a format."""
    return SAFE_WEIGHTS_NAME if safetensors else WEIGHTS_NAME


def index_name_for(safetensors: bool) -> str:
    """The index file name of a format."""
    return SAFE_WEIGHTS_INDEX_NAME if safetensors else WEIGHTS_INDEX_NAME


def shard_file_name(number: int, total: int, *, safetensors: bool) -> str:
    """Hugging Face shard name with 5-digit, 1-based numbers."""
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    return f"{stem}-{number:05d}-of-{total:05d}.{ext}"
