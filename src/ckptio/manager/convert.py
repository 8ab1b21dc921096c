"""Convert model weights between safetensors and PyTorch ``.bin`` Hugging Face directories.

:func:`convert_checkpoint` (what ``ckptio convert`` runs) reads the model of
a committed checkpoint, sharded or not, or of a plain Hugging Face model
directory, on any storage, and writes it to a new directory in the format
asked for, named as transformers names it: ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``;
``pytorch_model.bin`` or ``pytorch_model-0000i-of-0000n.bin`` +
``pytorch_model.bin.index.json``. ``safetensors``, ``torch.load(weights_only=True)``
and ``transformers`` read it without ckptio.

It reuses the export machinery (:mod:`ckptio.manager.export`): shards are
planned from metadata alone, then written shards first and the index last
(the index is the commit), and weight files of an earlier model that the new
index does not name are removed only after it is published. Memory holds:

* to safetensors: one tensor at a time, streamed into its shard;
* to ``.bin``: the tensors of one output shard (``torch.save`` pickles a shard
  whole), plus, from a ``.bin`` source, the one source file they come from.

Tied tensors are stored once and recorded as ``param_sharing`` in the index,
as the library's writer does: taken from the source index, or found in a
``.bin`` file whose entries share storage. The files copied along are the
config files of a checkpoint (as ``export`` copies them), or every other file
at the root of a plain model directory (tokenizer files, ``config.json``, ...).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from ckptio.errors import CheckpointExistsError, InvalidArgumentError
from ckptio.format.torch_io import write_torch_file
from ckptio.format.writer import write_with_retries
from ckptio.manager.export import (
    _check_apart,
    _copy_configs,
    _DcpSource,
    _Layout,
    _open_source,
    _plan,
    _publish,
    _stream_shard,
    _WeightsSource,
)
from ckptio.storage import Storage, resolve_storage
from ckptio.storage.integrity import FileRecord
from ckptio.storage.progress import ProgressCallback, ProgressCounter, ProgressStorage

__all__ = ["FORMATS", "convert_checkpoint"]

logger = logging.getLogger(__name__)

#: The formats :func:`convert_checkpoint` writes, by name: whether it is safetensors.
FORMATS = {"safetensors": True, "bin": False}

Location = str | os.PathLike[str] | Storage


def _safetensors(to: str) -> bool:
    try:
        return FORMATS[to]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            f"cannot convert to {to!r}: the formats are {', '.join(map(repr, FORMATS))}; nothing was written"
        ) from None


def _refuse_non_empty(target: Storage, overwrite: bool) -> None:
    held = len(target.list_objects(""))
    if held and not overwrite:
        raise CheckpointExistsError(
            f"cannot convert into {target.url!r}: it already holds {held} files; pass overwrite=True (--overwrite) "
            "to write over them; nothing was written"
        )


def _write_bin_shard(
    target: Storage,
    file_name: str,
    metas: Mapping[str, torch.Tensor],
    source: _DcpSource | _WeightsSource,
) -> FileRecord:
    """Read one output shard's tensors and ``torch.save`` them; again from scratch after a transient failure."""
    tensors = {name: source.read(name) for name in metas}
    return write_with_retries(target, file_name, lambda: write_torch_file(target, file_name, tensors))


def _write_shards(
    target: Storage,
    layout: _Layout,
    source: _DcpSource | _WeightsSource,
    safetensors: bool,
) -> list[FileRecord]:
    records = []
    try:
        for file_name, metas in layout.shards:
            if safetensors:
                write = partial(_stream_shard, target, file_name, metas, source.read)
                records.append(write_with_retries(target, file_name, write))
            else:
                records.append(_write_bin_shard(target, file_name, metas, source))
    finally:
        if isinstance(source, _WeightsSource):
            source.release()
    return records


def convert_checkpoint(
    src: Location,
    dst: Location,
    *,
    to: str,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    max_shard_size: int = 2**31,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> list[FileRecord]:
    """Write the model weights of ``src`` to the new directory ``dst`` as safetensors or ``.bin`` shards.

    Args:
        src: a committed checkpoint (sharded or not) or a Hugging Face model
            directory (path, URL or Storage).
        dst: the directory to write; it must be empty unless ``overwrite``.
        to: ``"safetensors"`` or ``"bin"``.
        storage_options: fsspec options for ``src`` (and ``dst``, unless given).
        dst_storage_options: fsspec options for ``dst``.
        max_shard_size: largest shard in bytes; a bigger tensor gets a shard of its own.
        overwrite: write into a ``dst`` that holds files (weight files the new
            index does not name are removed after it is published).
        progress: told the bytes written to ``dst`` so far (operation ``"convert"``, no total).

    Returns:
        A record per file written: copied files, shards, then the index.

    Raises:
        InvalidArgumentError: ``to`` is not a format, ``src`` and ``dst`` overlap,
            a bad ``max_shard_size``, or a dtype safetensors cannot hold.
        CheckpointNotFoundError: ``src`` holds no model weights.
        IncompleteCheckpointError: ``src`` is an uncommitted checkpoint.
        CheckpointExistsError: ``dst`` holds files and ``overwrite`` is False.
        CorruptCheckpointError: ``src``'s metadata disagrees with its data.
        In every case but a failure mid-write, nothing is written.
    """
    started = time.monotonic()
    safetensors = _safetensors(to)
    source_storage = resolve_storage(src, storage_options)
    target = resolve_storage(dst, storage_options if dst_storage_options is None else dst_storage_options)
    _check_apart(source_storage, target, "convert")
    source, copied = _open_source(source_storage, "convert", all_files=True)
    metadata = sharing = None
    if isinstance(source, _WeightsSource):
        metadata, sharing = source.metadata, source.sharing
    layout = _plan(
        source.metas,
        max_shard_size=max_shard_size,
        url=target.url,
        metadata=metadata,
        sharing=sharing,
        safetensors=safetensors,
    )
    _refuse_non_empty(target, overwrite)
    if progress is not None:
        target = ProgressStorage(target, ProgressCounter("convert", target.url, progress), writes=True)
    records = _copy_configs(source_storage, target, copied)
    records += _write_shards(target, layout, source, safetensors)
    records += _publish(target, layout)
    logger.info(
        "converted %s to %s in %s (%d tensors, %d files, %d bytes) in %.2fs",
        *(
            source_storage.url,
            to,
            target.url,
            len(layout.index["weight_map"]),
            len(records),
        ),
        *(sum(r.size for r in records), time.monotonic() - started),
    )
    return records
