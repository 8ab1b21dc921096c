"""Model weights as Hugging Face shards (safetensors or PyTorch ``.bin``) on any storage.

Public functions keep the seed design's names and arguments (see
``ckptio.format.api``); ``write_model_weights`` / ``read_model_weights`` /
``weight_files`` are the Storage-level calls the checkpoint manager builds on.
"""

from __future__ import annotations

from ckptio.format.api import (
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_shard_index,
    save_sharded_checkpoint,
)
from ckptio.format.constants import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from ckptio.format.index import load_shard_index
from ckptio.format.layout import CheckpointMeta, get_checkpoint_metadata, weight_files
from ckptio.format.planner import make_shard_index
from ckptio.format.reader import StateDictMismatchError, read_model_weights
from ckptio.format.sharing import create_sharing_metadata, retie_parameters
from ckptio.format.writer import write_model_weights

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointMeta",
    "StateDictMismatchError",
    "create_sharing_metadata",
    "get_checkpoint_metadata",
    "load_checkpoint",
    "load_shard_index",
    "load_sharded_checkpoint",
    "make_shard_index",
    "read_model_weights",
    "retie_parameters",
    "save_checkpoint",
    "save_shard_index",
    "save_sharded_checkpoint",
    "weight_files",
    "write_model_weights",
]
