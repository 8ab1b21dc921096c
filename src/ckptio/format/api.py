"""The public model-weights functions of the seed design, on any storage.

Every directory argument is a local path, an fsspec URL (``s3://bucket/run``)
or a :class:`~ckptio.storage.Storage`; ``storage_options`` configures the
backend (credentials, endpoint). Layout and file names are exactly those of
Hugging Face, so the output loads with ``transformers``, ``safetensors`` and
``huggingface_hub`` without ckptio.

A single-process save::

    save_checkpoint("s3://runs/a/model", model, safetensors=True)
    load_checkpoint("s3://runs/a/model", model)

A pipeline-parallel save (every rank plans the same index, writes its own
shards; rank 0 publishes the index after a barrier)::

    index = make_shard_index(stage_state_dicts, safetensors=True)
    save_sharded_checkpoint(url, index, my_stage, safetensors=True)
    barrier()
    if rank == 0:
        save_shard_index(index, url, SAFE_WEIGHTS_INDEX_NAME)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, overload

import torch
from torch import nn

from ckptio.format.reader import load_weights, read_model_weights, read_state_dict
from ckptio.format.writer import (
    publish_index,
    remove_stale_weight_files,
    state_dict_of,
    write_model_weights,
    write_shards,
)
from ckptio.storage import Storage, resolve_storage
from ckptio.storage.transfer import rate_summary

__all__ = [
    "load_checkpoint",
    "load_sharded_checkpoint",
    "save_checkpoint",
    "save_shard_index",
    "save_sharded_checkpoint",
]

Target = str | os.PathLike[str] | Storage

logger = logging.getLogger(__name__)


def save_checkpoint(
    output_dir: Target,
    module: nn.Module | Mapping[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    safetensors: bool = False,
    max_shard_size: int = 2**31,
    debug: bool = False,
    include_param_sharing: bool = True,
    param_sharing_metadata: Sequence[Sequence[str]] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Save ``module``'s weights into ``output_dir`` as an index plus Hugging Face shards.

    Shards are streamed (memory holds about one write buffer, not a shard) and
    published one by one; the index is published last and is the commit. Weight
    files of an earlier save that the new index does not name are removed
    afterwards. Tied parameters are stored once and recorded as
    ``param_sharing`` in the index metadata.

    Hugging Face shard names are fixed, so re-saving *in place* in the same
    format replaces same-named shards before the new index is published; a
    crash in between can leave the old index over new shards. Save each
    checkpoint into a fresh directory when that matters (the checkpoint
    manager does).

    Args:
        output_dir: directory, URL or Storage.
        module: an ``nn.Module`` or a ``dict[str, Tensor]``.
        metadata: JSON-serialisable values stored in the index metadata.
        safetensors: safetensors shards (else PyTorch ``.bin``; needed for tensor
            subclasses such as torchao quantized weights).
        max_shard_size: largest shard in bytes; a bigger tensor gets a shard of its own.
        debug: log every shard at INFO level.
        include_param_sharing: store tied tensors once (False stores every name).
        param_sharing_metadata: groups of tied names to use instead of detecting them.

    Raises:
        InvalidArgumentError: unusable arguments; nothing is published then.
        StorageError: the backend failed; the previous index (if any) still stands.
    """
    started = time.monotonic()
    storage = resolve_storage(output_dir, storage_options)
    records = write_model_weights(
        storage,
        module,
        safetensors=safetensors,
        max_shard_size=max_shard_size,
        metadata=metadata,
        include_param_sharing=include_param_sharing,
        param_sharing_metadata=param_sharing_metadata,
        debug=debug,
    )
    nbytes = sum(r.size for r in records)
    logger.info("saved model weights to %s: %s", storage.url, rate_summary(nbytes, time.monotonic() - started))


def load_checkpoint(
    model_dir: Target,
    module: nn.Module | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    assign: bool = False,
    keys: Iterable[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor] | None:
    """Load the weights in ``model_dir`` (sharded or single file, safetensors or PyTorch).

    With a module, loads into it following ``nn.Module.load_state_dict``
    (``strict``, ``assign``) and re-ties shared parameters; returns None.
    Tensors an index holds that the module lacks are skipped (logged at
    DEBUG), so each pipeline stage loads its own part of one shared index
    with ``strict=True``; a single weights file must match the module.
    Without one, returns ``{name: tensor}`` (tied aliases map to the same tensor).
    Missing names are reported before any shard is read; local safetensors are
    memory-mapped; on object stores ``keys`` fetches only those byte ranges.

    Raises:
        CheckpointNotFoundError: no weights there.
        StateDictMismatchError: names, shapes or dtypes do not fit the module.
        CorruptCheckpointError: malformed index, truncated shard, unsafe pickle.
    """
    started = time.monotonic()
    storage = resolve_storage(model_dir, storage_options)
    result = read_model_weights(storage, module, device=device, strict=strict, assign=assign, keys=keys)
    logger.info("loaded model weights from %s in %.2f s", storage.url, time.monotonic() - started)
    return result


def save_shard_index(
    shard_index: dict[str, Any],
    output_dir: Target,
    index_name: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Publish ``shard_index`` as ``<output_dir>/<index_name>``, then remove stale weight files.

    Call it once, after every shard the index names has been written (by
    :func:`save_sharded_checkpoint` on each rank): the index is the commit.
    """
    storage = resolve_storage(output_dir, storage_options)
    publish_index(storage, index_name, shard_index)
    remove_stale_weight_files(storage, index_name, shard_index)


def save_sharded_checkpoint(
    output_dir: Target,
    shard_index: dict[str, Any],
    module: nn.Module | Mapping[str, torch.Tensor],
    safetensors: bool = False,
    debug: bool = False,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write only the shards of ``shard_index`` that hold ``module``'s tensors; not the index.

    Each rank calls it for its own stage against one shared index (from
    :func:`make_shard_index`); then one rank calls :func:`save_shard_index`.

    Raises:
        InvalidArgumentError: the module holds tensors the index does not place,
            lacks tensors of a shard it owns, or ``safetensors`` disagrees with
            the index's file names.
    """
    storage = resolve_storage(output_dir, storage_options)
    write_shards(storage, shard_index, state_dict_of(module), safetensors=safetensors, debug=debug)


@overload
def load_sharded_checkpoint(
    model_dir: Target,
    shard_index: dict[str, Any],
    module: nn.Module,
    device: str | torch.device = ...,
    safetensors: bool = ...,
    strict: bool = ...,
    assign: bool = ...,
    debug: bool = ...,
    keys: Iterable[str] | None = ...,
    *,
    storage_options: dict[str, Any] | None = ...,
) -> set[str]: ...


@overload
def load_sharded_checkpoint(
    model_dir: Target,
    shard_index: dict[str, Any],
    module: None = ...,
    device: str | torch.device = ...,
    safetensors: bool = ...,
    strict: bool = ...,
    assign: bool = ...,
    debug: bool = ...,
    keys: Iterable[str] | None = ...,
    *,
    storage_options: dict[str, Any] | None = ...,
) -> dict[str, torch.Tensor]: ...


def load_sharded_checkpoint(
    model_dir: Target,
    shard_index: dict[str, Any],
    module: nn.Module | None = None,
    device: str | torch.device = "cpu",
    safetensors: bool = False,
    strict: bool = True,
    assign: bool = False,
    debug: bool = False,
    keys: Iterable[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> set[str] | dict[str, torch.Tensor]:
    """Load the shards ``shard_index`` names from ``model_dir`` (see :func:`load_checkpoint`).

    ``shard_index`` may describe more than ``module`` (one index shared by all
    pipeline stages): tensors the module lacks are skipped even when strict.
    Each shard's format is taken from its file name, so ``safetensors`` is
    accepted for compatibility with the seed design and otherwise unused.

    Args:
        debug: log every shard read at INFO level (else DEBUG).

    Returns:
        With a module: the names of its state dict that were not loaded (empty
        when all were; with ``strict=False`` the missing ones are here).
        Without one: ``{name: tensor}``.

    Raises:
        StateDictMismatchError: the index lacks names of the module (strict),
            or shapes or dtypes do not fit.
        CorruptCheckpointError: a truncated or corrupt shard, an unsafe pickle.
        ObjectNotFoundError: a shard the index names does not exist.
    """
    del safetensors  # the shard file names say which format each shard is
    storage = resolve_storage(model_dir, storage_options)
    if module is None:
        return read_state_dict(storage, device=device, keys=keys, shard_index=shard_index, debug=debug)
    return load_weights(
        storage, module, device=device, strict=strict, assign=assign, keys=keys, shard_index=shard_index, debug=debug
    )
