"""Export a checkpoint's model as a plain Hugging Face safetensors directory.

:func:`export_checkpoint` turns any committed checkpoint into a directory that
``safetensors``, ``transformers.from_pretrained`` or any Hugging Face loader
opens: ``model-0000i-of-0000n.safetensors`` shards and
``model.safetensors.index.json`` (or one ``model.safetensors`` when everything
fits in one shard), plus ``config.json`` / ``generation_config.json`` when the
checkpoint holds them.

* A *sharded* checkpoint (FSDP2 / tensor-parallel state written through DCP,
  :mod:`ckptio.manager.sharded`) holds no full tensor anywhere. Each model
  tensor is assembled from its stored chunks by ranged reads of exactly the
  chunks' bytes, straight into the tensor's memory (each contiguous run of a
  chunk lands in place, whatever dimensions it was split along), then streamed
  into the shard being written and dropped before the next one is read: memory
  holds the largest tensor plus the ranges in flight (at most
  ``_FILE_WORKERS * _RANGES_PER_FILE`` reads of ``READ_RANGE_SIZE`` bytes,
  128 MiB), never the model. Optimizer state is never read.
* An *unsharded* checkpoint's safetensors shards are re-sharded the same way,
  one tensor at a time; ``.bin`` shards are converted to safetensors (a
  ``.bin`` file can only be unpickled whole, so memory holds one ``.bin`` file
  at a time; locally it is memory-mapped).

The shards are planned from metadata alone (DCP metadata, safetensors headers,
``.bin`` pickles loaded onto the meta device) before a byte of tensor data is
read, and the destination is written as the library writes every model
directory: shards first, the index last, stale weight files of an earlier
export removed only after that.

:func:`save_sharded_model` is the collective that writes such a directory
from a live sharded model: every rank gathers each ``DTensor`` with
``full_tensor()``, one at a time, and rank 0 streams it into its shard.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from ckptio.checkpoint import CheckpointStatus, inspect_checkpoint
from ckptio.checkpoint.layout import DCP_METADATA_NAME
from ckptio.checkpoint.manifest import CheckpointManifest
from ckptio.dcp import StorageReader
from ckptio.dcp.layout import ItemLocation, raw_bytes
from ckptio.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
)
from ckptio.format import weight_files
from ckptio.format.constants import (
    SAFE_WEIGHTS_NAME,
    SAFETENSORS_METADATA,
    index_name_for,
    weights_name_for,
)
from ckptio.format.index import index_shard_files, read_index
from ckptio.format.layout import detect_layout, is_weight_file_name
from ckptio.format.planner import PARAM_SHARING_KEY, alias_names, make_shard_index
from ckptio.format.ranged_reads import READ_RANGE_SIZE, read_into
from ckptio.format.reader import _checkpoint_sharing
from ckptio.format.safetensors_io import (
    SafetensorsHeader,
    check_writable,
    encode_header,
    read_header,
    read_safetensors,
    tensor_chunks,
)
from ckptio.format.sharing import create_sharing_metadata
from ckptio.format.torch_io import read_torch_file
from ckptio.format.writer import (
    publish_index,
    remove_stale_weight_files,
    write_with_retries,
)
from ckptio.manager.failures import on_every_rank
from ckptio.manager.model_dir import _CONFIG_FILES, _config_files
from ckptio.state import World
from ckptio.storage import ObjectInfo, Storage, resolve_storage
from ckptio.storage.integrity import ChecksumWriter, FileRecord, checksum_bytes
from ckptio.storage.transfer import map_unordered

__all__ = ["CONFIG_FILE_NAMES", "chunk_runs", "export_checkpoint", "save_sharded_model"]

logger = logging.getLogger(__name__)

#: Files copied along with the weights when the checkpoint holds them.
CONFIG_FILE_NAMES = tuple(_CONFIG_FILES.values())
#: Key prefix of the model's tensors in a sharded (DCP) checkpoint; optimizer state is ``optimizer.*``.
_MODEL_PREFIX = "model."
#: Data files of one tensor read at once, each with this many ranged reads in flight: bounds the
#: read buffers held besides the tensor being assembled (8 reads of at most 16 MiB).
_FILE_WORKERS = 4
_RANGES_PER_FILE = 2
#: Runs of a chunk (rows of it, when it is split along a late dimension) placed per ranged read plan.
_RUNS_PER_READ = 16384
#: Safetensors headers fetched at once.
_HEADER_WORKERS = 8

Location = str | os.PathLike[str] | Storage


# -- planning ---------------------------------------------------------------
def _meta(dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` holding no data: what planning needs."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


@dataclass(frozen=True)
class _Layout:
    """The directory to write: its index, and each shard's tensors (meta) in the order the shard holds them.

    ``index_name`` is None for a single ``weights_name`` file (no index then).
    """

    index: dict[str, Any]
    shards: list[tuple[str, dict[str, torch.Tensor]]]
    index_name: str | None
    weights_name: str = SAFE_WEIGHTS_NAME

    def order(self) -> list[str]:
        """Every tensor name in the order its bytes are written (shard by shard, header order)."""
        return [name for _, metas in self.shards for name in _header_order(metas)]


def _header_order(metas: Mapping[str, torch.Tensor]) -> list[str]:
    """The order the safetensors writer lays out a shard's tensors in (see :func:`encode_header`)."""
    return encode_header(metas, SAFETENSORS_METADATA)[1]


def _plan(
    metas: Mapping[str, torch.Tensor],
    *,
    max_shard_size: int,
    url: str,
    metadata: Mapping[str, Any] | None = None,
    sharing: Sequence[Sequence[str]] | None = None,
    safetensors: bool = True,
) -> _Layout:
    """Split ``metas`` (name -> meta tensor, in write order) into safetensors (or ``.bin``) shards. Pure.

    Raises:
        InvalidArgumentError: no tensors, a bad ``max_shard_size``, or a dtype safetensors lacks.
    """
    if not metas:
        raise InvalidArgumentError(f"cannot write a model to {url!r}: the checkpoint holds no model tensors")
    if safetensors:
        for name, meta in metas.items():
            check_writable(name, torch.empty((0,), dtype=meta.dtype), url)  # the dtype check, without data
    index = make_shard_index(
        [metas], metadata, safetensors=safetensors, max_shard_size=max_shard_size, param_sharing_metadata=sharing
    )
    single = len(index_shard_files(index)) == 1
    weights_name = weights_name_for(safetensors)
    if single:  # as transformers names it: no index for one shard
        index["weight_map"] = dict.fromkeys(index["weight_map"], weights_name)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, file_name in index["weight_map"].items():
        shards.setdefault(file_name, {})[name] = metas[name]
    return _Layout(index, sorted(shards.items()), None if single else index_name_for(safetensors), weights_name)


# -- writing ------------------------------------------------------------------
def _write_tensor(writer: ChecksumWriter, tensor: torch.Tensor) -> None:
    """Append ``tensor``'s bytes; no slice of it outlives the call."""
    for chunk in tensor_chunks(tensor):
        writer.write(chunk)


def _check_produced(name: str, tensor: torch.Tensor, meta: torch.Tensor, url: str) -> None:
    """The tensor read must be what the header written before it promised."""
    check_writable(name, tensor, url)
    if tensor.dtype != meta.dtype or tuple(tensor.shape) != tuple(meta.shape):
        raise CorruptCheckpointError(
            f"cannot write {name!r} to {url!r}: the checkpoint's metadata says {meta.dtype} {list(meta.shape)}, "
            f"its data is {tensor.dtype} {list(tensor.shape)}; nothing was published under that name"
        )


def _stream_shard(
    storage: Storage, file_name: str, metas: Mapping[str, torch.Tensor], produce: Callable[[str], torch.Tensor]
) -> FileRecord:
    """Write one safetensors shard whose tensors ``produce(name)`` returns one at a time.

    The header comes from ``metas`` alone; each tensor is asked for only when
    its bytes are due and is released before the next one is asked for, so
    memory holds one tensor. The shard is published only when complete.
    """
    url = storage.url_of(file_name)
    header, order = encode_header(metas, SAFETENSORS_METADATA)
    writer = ChecksumWriter(storage.open_writer(file_name), file_name)
    with writer:
        writer.write(header)
        for name in order:
            tensor = produce(name)
            _check_produced(name, tensor, metas[name], url)
            _write_tensor(writer, tensor)
            del tensor  # before the next one is produced
    if writer.record is None:  # pragma: no cover - commit always sets it
        raise RuntimeError(f"writer for {url!r} committed without a record")
    return writer.record


def _publish(storage: Storage, layout: _Layout) -> list[FileRecord]:
    """Publish the index (several shards), then remove weight files of an earlier save it does not name."""
    records = [publish_index(storage, layout.index_name, layout.index)] if layout.index_name is not None else []
    remove_stale_weight_files(storage, layout.index_name or layout.weights_name, layout.index)
    return records


def _refuse_existing(storage: Storage, overwrite: bool, hint: str) -> None:
    if not overwrite and weight_files(storage) is not None:
        raise CheckpointExistsError(
            f"cannot write a model to {storage.url!r}: it already holds model weights; {hint} to replace them; "
            "nothing was written"
        )


# -- sharded (DCP) checkpoints ----------------------------------------------------
def chunk_runs(
    shape: Sequence[int], offsets: Sequence[int], sizes: Sequence[int], itemsize: int
) -> Iterator[tuple[int, int, int]]:
    """The contiguous runs of a row-major chunk inside the row-major full tensor. Pure.

    A chunk (the box ``offsets + [0, sizes)`` of a tensor of ``shape``, stored
    row-major on its own) is a sequence of runs that are contiguous both in the
    chunk and in the full tensor: its rows along the last dimension it does
    not cover whole, with every dimension after that one whole. Yields
    ``(byte offset in the chunk, byte offset in the tensor, bytes)``, in chunk
    order, so a chunk split along dimension 0 is one run.
    """
    ndim = len(shape)
    if math.prod(sizes) == 0:
        return
    if ndim == 0:
        yield 0, 0, itemsize
        return
    split = ndim - 1  # the first dimension from which on the chunk's runs are contiguous in the tensor
    while split > 0 and sizes[split] == shape[split]:
        split -= 1
    strides = [math.prod(shape[d + 1 :]) for d in range(ndim)]
    run = math.prod(sizes[split:]) * itemsize
    base = sum(offsets[d] * strides[d] for d in range(split, ndim))
    for position, index in enumerate(itertools.product(*(range(n) for n in sizes[:split]))):
        start = base + sum((offsets[d] + i) * strides[d] for d, i in enumerate(index))
        yield position * run, start * itemsize, run


@dataclass(frozen=True)
class _Piece:
    """One stored chunk of a tensor: where its bytes are and which box of the tensor they fill."""

    file: str
    file_offset: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class _DcpSource:
    """The model tensors of a sharded checkpoint, assembled from their chunks one at a time."""

    def __init__(self, storage: Storage, manifest: CheckpointManifest) -> None:
        self.storage = storage
        # Checks every listed file against the manifest and the metadata's CRC32C.
        metadata = StorageReader(storage, known_files=manifest.files).read_metadata()
        locations = metadata.storage_data
        if not isinstance(locations, dict) or not all(isinstance(v, ItemLocation) for v in locations.values()):
            raise CorruptCheckpointError(
                f"cannot export {storage.url!r}: its DCP metadata was not written by ckptio; nothing was written"
            )
        sizes = {r.path: r.size for r in manifest.files}
        self.metas: dict[str, torch.Tensor] = {}
        self.pieces: dict[str, list[_Piece]] = {}
        skipped: list[str] = []
        for fqn, entry in metadata.state_dict_metadata.items():
            if not fqn.startswith(_MODEL_PREFIX):
                continue
            if not isinstance(entry, TensorStorageMetadata):
                skipped.append(fqn)
                continue
            name = fqn[len(_MODEL_PREFIX) :]
            dtype, shape = entry.properties.dtype, tuple(entry.size)
            pieces = [
                self._piece(fqn, dtype, shape, tuple(c.offsets), tuple(c.sizes), locations, sizes)
                for c in entry.chunks
            ]
            if sum(math.prod(p.sizes) for p in pieces) != math.prod(shape):
                raise CorruptCheckpointError(
                    f"cannot export {storage.url!r}: the chunks of {fqn!r} do not cover its shape {list(shape)}; "
                    "nothing was written"
                )
            self.metas[name] = _meta(dtype, shape)
            self.pieces[name] = pieces
        if skipped:
            logger.warning("not exported from %s (not tensors): %s", storage.url, ", ".join(skipped))
        if not self.metas:
            raise CheckpointNotFoundError(
                f"cannot export {storage.url!r}: its sharded state holds no {_MODEL_PREFIX!r} tensors "
                "(no model was saved with it); nothing was written"
            )

    def _piece(
        self,
        fqn: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        locations: Mapping[MetadataIndex, ItemLocation],
        file_sizes: Mapping[str, int],
    ) -> _Piece:
        """Where one chunk is, checked against the tensor's shape and the manifest's file sizes."""
        location = locations.get(MetadataIndex(fqn, torch.Size(offsets)))
        fits = len(offsets) == len(sizes) == len(shape) and all(
            o >= 0 and n >= 0 and o + n <= d for o, n, d in zip(offsets, sizes, shape, strict=True)
        )
        problem = None
        if location is None:
            problem = "has no location"
        elif not fits:
            problem = f"does not fit in the tensor's shape {list(shape)}"
        elif location.length != math.prod(sizes) * dtype.itemsize:
            problem = f"takes {location.length} bytes, not the {math.prod(sizes) * dtype.itemsize} of its box"
        elif not 0 <= location.offset <= location.offset + location.length <= file_sizes.get(location.file, -1):
            problem = f"lies outside {location.file!r} as the manifest lists it"
        if problem is not None or location is None:
            raise CorruptCheckpointError(
                f"cannot export {self.storage.url!r}: chunk {list(offsets)}+{list(sizes)} of {fqn!r} {problem}; "
                "nothing was written"
            )
        return _Piece(location.file, location.offset, offsets, sizes)

    def read(self, name: str) -> torch.Tensor:
        """The full tensor ``name``: every chunk's runs read straight into their place, a few chunks at once."""
        meta = self.metas[name]
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        if tensor.numel() == 0:
            return tensor
        memory = raw_bytes(tensor)

        def fetch(piece: _Piece) -> None:
            runs = chunk_runs(meta.shape, piece.offsets, piece.sizes, meta.dtype.itemsize)
            for batch in _batches(runs):
                placements = [(piece.file_offset + at, memory[start : start + size]) for at, start, size in batch]
                read_into(self.storage, piece.file, placements, workers=_RANGES_PER_FILE)

        pieces = self.pieces[name]
        for _ in map_unordered(fetch, pieces, workers=self.storage.concurrency(_FILE_WORKERS), thread_name="ckptio-export"):
            pass
        return tensor


def _batches(runs: Iterator[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
    """Runs in groups of at most :data:`_RUNS_PER_READ` runs or about ``READ_RANGE_SIZE`` bytes.

    A chunk split along a late dimension is many short runs (one per row); taking
    them a group at a time keeps the bookkeeping small, and each group is still
    one stretch of the data file (a few ranged reads).
    """
    batch: list[tuple[int, int, int]] = []
    size = 0
    for run in runs:
        batch.append(run)
        size += run[2]
        if len(batch) >= _RUNS_PER_READ or size >= READ_RANGE_SIZE:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# -- unsharded checkpoints: Hugging Face weight files ----------------------------------
class _WeightsSource:
    """The tensors of a Hugging Face weights directory (safetensors or ``.bin``), one at a time."""

    def __init__(self, storage: Storage, verb: str = "export") -> None:
        self.storage = storage
        self.verb = verb
        meta = detect_layout(storage)
        if meta is None:
            raise CheckpointNotFoundError(
                f"cannot {verb} {storage.url!r}: it holds no model weights (no index, {SAFE_WEIGHTS_NAME!r}, "
                "pytorch_model.bin or sharded model state); nothing was written"
            )
        self.metadata: dict[str, Any] = {}
        self.sharing: list[list[str]] | None = None
        if meta.is_index:
            index = read_index(storage, meta.file_name)
            weight_map: dict[str, str] = dict(index["weight_map"])
            self.metadata = {k: v for k, v in index["metadata"].items() if k != PARAM_SHARING_KEY}
            self.sharing = _checkpoint_sharing(index["metadata"], storage.url_of(meta.file_name)) or None
        else:
            weight_map = {}
        files = sorted(set(weight_map.values())) if meta.is_index else [meta.file_name]
        self.headers: dict[str, SafetensorsHeader] = {}
        self.file_of: dict[str, str] = {}
        self.metas: dict[str, torch.Tensor] = {}
        self._loaded: tuple[str, dict[str, torch.Tensor]] | None = None
        if meta.safetensors:
            self._plan_safetensors(files, weight_map if meta.is_index else None)
        else:
            self._plan_torch(files, weight_map if meta.is_index else None)

    def _names_of(self, file_name: str, found: Sequence[str], weight_map: Mapping[str, str] | None) -> list[str]:
        if weight_map is None:
            return list(found)
        wanted = [n for n, f in weight_map.items() if f == file_name]
        absent = sorted(set(wanted) - set(found))
        if absent:
            raise CorruptCheckpointError(
                f"cannot {self.verb}: {self.storage.url_of(file_name)!r} does not hold {absent[:10]} although the index "
                "says it does; nothing was written"
            )
        return wanted

    def _plan_safetensors(self, files: list[str], weight_map: Mapping[str, str] | None) -> None:
        """Headers only (a ranged read or two per shard), tensors in file order."""
        workers = self.storage.concurrency(_HEADER_WORKERS)
        for file_name, header in map_unordered(lambda f: (f, read_header(self.storage, f)), files, workers=workers):
            self.headers[file_name] = header
        for file_name in files:
            entries = self.headers[file_name].entries
            names = self._names_of(file_name, list(entries), weight_map)
            for name in sorted(names, key=lambda n: entries[n].start):
                self.file_of[name] = file_name
                self.metas[name] = _meta(entries[name].dtype, entries[name].shape)

    def _plan_torch(self, files: list[str], weight_map: Mapping[str, str] | None) -> None:
        """Each ``.bin`` loaded onto the meta device (memory-mapped when local): its pickle is read,
        never its tensor data.

        Unless the index records ``param_sharing``, entries of one local file that view the same
        memory (tied weights, which ``torch.save`` stores once) become its groups; a remote file's
        meta tensors do not tell, so its tied entries are written as separate tensors.
        """
        groups: list[list[str]] = []
        for file_name in files:
            device = "cpu" if self.storage.local_path(file_name) is not None else "meta"  # cpu: mapped, not read
            loaded = read_torch_file(self.storage, file_name, device=device)
            position = {name: i for i, name in enumerate(loaded)}
            names = sorted(self._names_of(file_name, list(loaded), weight_map), key=position.__getitem__)
            for name in names:  # in the order the file holds them, as safetensors ones are taken
                self.file_of[name] = file_name
                self.metas[name] = _meta(loaded[name].dtype, loaded[name].shape)
            groups += create_sharing_metadata({n: loaded[n] for n in names})
            del loaded
        if self.sharing is None and groups:
            self.sharing = groups

    def read(self, name: str) -> torch.Tensor:
        file_name = self.file_of[name]
        header = self.headers.get(file_name)
        if header is not None:
            return read_safetensors(self.storage, file_name, [name], header=header)[name]
        if self._loaded is None or self._loaded[0] != file_name:
            self._loaded = None  # one .bin file in memory at a time
            self._loaded = (file_name, read_torch_file(self.storage, file_name))
        return self._loaded[1][name]

    def release(self) -> None:
        self._loaded = None


# -- export --------------------------------------------------------------------------
def _check_apart(src: Storage, dst: Storage, verb: str = "export") -> None:
    a, b = src.url.rstrip("/") + "/", dst.url.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise InvalidArgumentError(f"cannot {verb} {src.url!r} into {dst.url!r}: the two overlap; nothing was written")


def _other_files(objects: Mapping[str, ObjectInfo]) -> list[str]:
    """The files at the root of a plain model directory besides its weights (config, tokenizer, ...)."""
    return sorted(k for k in objects if "/" not in k and not k.startswith(".") and not is_weight_file_name(k))


def _open_source(
    storage: Storage, verb: str = "export", *, all_files: bool = False
) -> tuple[_DcpSource | _WeightsSource, list[str]]:
    """The checkpoint's model tensors, and the files to copy with them; refuses anything not committed.

    Those files are the config files (:data:`CONFIG_FILE_NAMES`) the checkpoint holds; with
    ``all_files``, a plain model directory (no manifest) gives every non-weight file at its root.
    """
    inspection = inspect_checkpoint(storage)
    why = "; ".join(inspection.problems) or inspection.status.value
    if inspection.status is CheckpointStatus.NOT_A_CHECKPOINT:
        raise CheckpointNotFoundError(
            f"cannot {verb} {storage.url!r}: it is not a checkpoint ({why}); give a checkpoint directory such as "
            "<output_dir>/checkpoints/checkpoint-N or a model directory; nothing was written"
        )
    if inspection.status is not CheckpointStatus.COMPLETE:
        raise IncompleteCheckpointError(
            f"cannot {verb} {storage.url!r}: it is not a committed, complete checkpoint ({why}); nothing was written"
        )
    manifest = inspection.manifest
    if all_files and manifest is None:
        configs = _other_files(inspection.objects)
    else:
        configs = [name for name in CONFIG_FILE_NAMES if name in inspection.objects]
    if manifest is not None and manifest.file_record(DCP_METADATA_NAME) is not None:
        return _DcpSource(storage, manifest), configs
    return _WeightsSource(storage, verb), configs


def _copy_configs(src: Storage, dst: Storage, names: Sequence[str]) -> list[FileRecord]:
    records = []
    for name in names:
        data = src.read_bytes(name)
        dst.write_bytes(name, data)
        records.append(FileRecord(name, len(data), checksum_bytes(data)))
    return records


def export_checkpoint(
    src: Location,
    dst: Location,
    *,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    max_shard_size: int = 2**31,
    overwrite: bool = False,
) -> list[FileRecord]:
    """Write the model of a committed checkpoint as a plain Hugging Face safetensors directory.

    Works for every checkpoint the library writes: sharded (FSDP2 / DTensor
    state through DCP) or unsharded (safetensors or ``.bin`` shards, or a
    plain model directory). Shards are planned from metadata alone; tensors
    are read one at a time, each only as its bytes are due in the shard being
    written (see the module docstring for the memory this takes).

    Args:
        src: the checkpoint directory (path, URL or Storage).
        dst: the model directory to write.
        storage_options: fsspec options for ``src`` (and ``dst``, unless given).
        dst_storage_options: fsspec options for ``dst``.
        max_shard_size: largest shard in bytes; a bigger tensor gets a shard of its own.
        overwrite: replace weights already at ``dst`` (files of them that the
            new export does not name are removed after its index is published).

    Returns:
        A record per file written: config files, shards, then the index.

    Raises:
        IncompleteCheckpointError: ``src`` is not committed (a save crashed or
            is running, or a listed file is missing); nothing is written.
        CheckpointNotFoundError: ``src`` is not a checkpoint or holds no model.
        CheckpointExistsError: ``dst`` holds weights and ``overwrite`` is False.
        CorruptCheckpointError: metadata inconsistent with the data.
        InvalidArgumentError: ``src`` and ``dst`` overlap, a bad ``max_shard_size``,
            or a dtype safetensors cannot hold.
    """
    started = time.monotonic()
    source_storage = resolve_storage(src, storage_options)
    target = resolve_storage(dst, storage_options if dst_storage_options is None else dst_storage_options)
    _check_apart(source_storage, target)
    source, configs = _open_source(source_storage)
    sharing = source.sharing if isinstance(source, _WeightsSource) else None
    metadata = source.metadata if isinstance(source, _WeightsSource) else None
    layout = _plan(source.metas, max_shard_size=max_shard_size, url=target.url, metadata=metadata, sharing=sharing)
    _refuse_existing(target, overwrite, "pass overwrite=True (--overwrite)")
    records = _copy_configs(source_storage, target, configs)
    try:
        for file_name, metas in layout.shards:
            write = partial(_stream_shard, target, file_name, metas, source.read)
            records.append(write_with_retries(target, file_name, write))
    finally:
        if isinstance(source, _WeightsSource):
            source.release()
    records += _publish(target, layout)
    logger.info(
        "exported %s to %s (%d tensors, %d files, %d bytes) in %.2fs",
        source_storage.url,
        target.url,
        len(layout.index["weight_map"]),
        len(records),
        sum(r.size for r in records),
        time.monotonic() - started,
    )
    return records


# -- save_model of a sharded model -------------------------------------------------------
class _Gather:
    """Every rank's full tensors, one at a time, in the one order every rank follows."""

    def __init__(self, state: Mapping[str, torch.Tensor], order: Sequence[str]) -> None:
        self.state = state
        self.pending = deque(order)

    def __call__(self, name: str) -> torch.Tensor:
        expected = self.pending.popleft()
        if name != expected:  # pragma: no cover - the writer follows the same plan
            raise RuntimeError(f"gathering {name!r} out of order (expected {expected!r})")
        from torch.distributed.tensor import DTensor

        value = self.state[name].detach()
        return value.full_tensor() if isinstance(value, DTensor) else value

    def drain(self) -> None:
        """Take part in every gather still due, discarding the tensors (other ranks wait on them)."""
        while self.pending:
            self(self.pending[0])


def _signature(layout: _Layout) -> str:
    plan = [(f, n, str(m.dtype), tuple(m.shape)) for f, metas in layout.shards for n, m in metas.items()]
    return hashlib.sha256(repr(plan).encode()).hexdigest()


def save_sharded_model(
    storage: Storage,
    model: nn.Module,
    world: World,
    *,
    max_shard_size: int = 2**31,
    overwrite: bool = False,
) -> list[FileRecord]:
    """Write a sharded (DTensor) model as a Hugging Face safetensors directory; a collective.

    Every rank calls it. For each entry of the model's state dict, in one
    order all ranks compute from the (global) shapes alone (shard by shard,
    each shard's header order), every rank gathers it with ``full_tensor()``
    and rank 0 streams it into the shard being written, then drops it: no rank
    ever holds more than one full tensor. Rank 0 then publishes the index and
    writes ``config.json`` (and ``generation_config.json``) when the model has
    a ``save_pretrained``-style config. Tied parameters are stored once and
    recorded as ``param_sharing`` in the index.

    If rank 0's writing fails, it keeps taking part in the remaining gathers
    (so no rank is left waiting) and every rank then raises the same error.
    A failed shard is not retried (that would need every rank to gather again).

    Returns:
        On rank 0 the records of the files written; ``[]`` on the other ranks.

    Raises:
        CheckpointExistsError: ``storage`` already holds weights and ``overwrite``
            is False; nothing is written (on every rank).
        InvalidArgumentError: the ranks' models differ, or a dtype safetensors lacks.
    """
    state = model.state_dict()
    url = storage.url
    action = f"cannot save the model to {url!r}"
    safe = "checkpoints are untouched"
    holder: list[_Layout] = []

    def plan() -> str:
        sharing = create_sharing_metadata(model)
        aliases = alias_names(sharing)
        metas = {n: _meta(t.dtype, t.shape) for n, t in state.items() if n not in aliases}
        holder.append(_plan(metas, max_shard_size=max_shard_size, url=url, sharing=sharing or None))
        if world.rank == 0:
            _refuse_existing(storage, overwrite, "pass overwrite_output_dir=True")
        return _signature(holder[0])

    signatures = on_every_rank(world, plan, action=action, safe=safe)
    if len(set(signatures)) > 1:
        raise InvalidArgumentError(f"{action}: the ranks' models have different state dicts; {safe}")
    layout = holder[0]

    def write() -> list[FileRecord]:
        gather = _Gather(state, layout.order())
        if world.rank != 0:
            gather.drain()
            return []
        try:
            records = [_stream_shard(storage, file_name, metas, gather) for file_name, metas in layout.shards]
        except Exception:
            gather.drain()
            raise
        for file_name, data in _config_files(model).items():
            storage.write_bytes(file_name, data)
            records.append(FileRecord(file_name, len(data), checksum_bytes(data)))
        return records + _publish(storage, layout)

    records = on_every_rank(world, write, action=action, safe=safe, share=False)[0]
    if world.rank == 0:
        logger.info("saved sharded model to %s (%d files)", url, len(records))
    return records
