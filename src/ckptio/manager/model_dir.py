"""A final, Hugging Face-style model directory: weights plus the model's config."""

from __future__ import annotations

import logging

import torch

from ckptio.errors import CheckpointExistsError
from ckptio.format import weight_files, write_model_weights
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord, checksum_bytes

__all__ = ["save_model_directory"]

logger = logging.getLogger(__name__)

_CONFIG_FILES = {"config": "config.json", "generation_config": "generation_config.json"}


def _config_files(model: torch.nn.Module) -> dict[str, bytes]:
    """JSON of the model's ``config`` (and ``generation_config``) where it has ``save_pretrained``-style ones."""
    found: dict[str, bytes] = {}
    for attr, file_name in _CONFIG_FILES.items():
        config = getattr(model, attr, None)
        to_json = getattr(config, "to_json_string", None)
        if callable(to_json):
            found[file_name] = str(to_json()).encode()
    return found


def save_model_directory(
    storage: Storage,
    model: torch.nn.Module,
    *,
    safetensors: bool = True,
    max_shard_size: int = 2**31,
    overwrite: bool = False,
) -> list[FileRecord]:
    """Write ``model``'s weights and config so that ``from_pretrained(storage)`` opens it.

    Raises:
        CheckpointExistsError: the directory already holds weights and ``overwrite`` is False;
            nothing is written then.
    """
    if not overwrite and weight_files(storage) is not None:
        raise CheckpointExistsError(
            f"cannot save model to {storage.url!r}: it already holds model weights; "
            "pass overwrite_output_dir=True to replace them"
        )
    records = write_model_weights(storage, model, safetensors=safetensors, max_shard_size=max_shard_size)
    for file_name, data in _config_files(model).items():
        storage.write_bytes(file_name, data)
        records.append(FileRecord(file_name, len(data), checksum_bytes(data)))
    logger.info("saved model directory %s (%d files)", storage.url, len(records))
    return records
