"""``ckptio.dcp.StorageWriter``: DCP's save over any ckptio storage, committed by a manifest.

DCP calls, in order: ``set_up_storage_writer`` and ``prepare_local_plan`` on
every rank, ``prepare_global_plan`` on the coordinator, ``write_data`` on every
rank, ``finish`` on the coordinator. The coordinator refuses a target that
already holds a committed checkpoint and writes the in-progress marker in
``prepare_global_plan``, before any rank writes data; every rank streams its
items into a few data files at once; ``finish`` writes DCP's metadata and then
the manifest, created exclusively, last.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter as _DCPStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ckptio.checkpoint.claim import SaveClaim
from ckptio.checkpoint.commit import begin_checkpoint, commit_checkpoint, is_committed
from ckptio.checkpoint.layout import MANIFEST_NAME
from ckptio.checkpoint.manifest import CheckpointManifest, utc_timestamp
from ckptio.dcp.layout import (
    FORMAT_NAME,
    METADATA_NAME,
    ItemLocation,
    RankAssignment,
    WrittenItem,
    data_file_name,
    encode_metadata,
    raw_bytes,
)
from ckptio.dcp.target import CheckpointTarget
from ckptio.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    InvalidArgumentError,
)
from ckptio.storage import Storage
from ckptio.storage.integrity import ChecksumWriter, FileRecord, checksum_bytes
from ckptio.storage.transfer import map_concurrently

__all__ = ["StorageWriter"]

#: Data files per rank written at once on backends that overlap requests (one elsewhere).
DEFAULT_FILES_PER_RANK = 4
#: What ``Metadata.version`` says when torch does not name its current DCP version.
_FALLBACK_DCP_VERSION = "1.0.0"
_UNCOMMITTED = "the checkpoint is left uncommitted (never loaded) and earlier checkpoints are untouched"


def _dcp_version() -> str:
    from torch.distributed.checkpoint import filesystem

    return str(getattr(filesystem, "CURRENT_DCP_VERSION", _FALLBACK_DCP_VERSION))


def _item_size(item: WriteItem) -> int:
    """Bytes this rank writes for ``item``: its chunk for a tensor (not the whole tensor)."""
    if item.tensor_data is not None:
        return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
    return item.bytes_io_data.nbytes if item.bytes_io_data is not None else 0


def split_items(items: Sequence[WriteItem], files: int) -> list[list[WriteItem]]:
    """Spread ``items`` over at most ``files`` groups of about equal bytes (largest first, each into
    the lightest group); groups keep the plan's order and empty ones are dropped."""
    loads = [0] * max(1, files)
    groups: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(items)), key=lambda i: -_item_size(items[i])):
        lightest = loads.index(min(loads))
        groups[lightest].append(i)
        loads[lightest] += _item_size(items[i])
    return [[items[i] for i in sorted(group)] for group in groups if group]


def tensor_bytes(tensor: torch.Tensor, *, expected: int | None, what: str) -> memoryview:
    """The raw row-major bytes of ``tensor`` on the CPU (copied only when it is not already so).

    Raises:
        InvalidArgumentError: a sparse or quantized tensor, or not ``expected`` bytes long;
            ``what`` names the item and where it was going.
    """
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise InvalidArgumentError(
            f"cannot save {what}: only dense tensors are supported, got {tensor.layout}; {_UNCOMMITTED}"
        )
    data = raw_bytes(tensor.detach().cpu().resolve_conj().resolve_neg().contiguous())
    if expected is not None and data.nbytes != expected:
        raise InvalidArgumentError(
            f"cannot save {what}: the planner gave {data.nbytes} bytes, its plan says {expected}; {_UNCOMMITTED}"
        )
    return data


def _item_bytes(item: WriteItem, data: torch.Tensor | io.BytesIO, url: str) -> memoryview:
    what = f"{item.index.fqn!r} to {url!r}"
    if item.type == WriteItemType.BYTE_IO:
        if not isinstance(data, io.BytesIO):
            raise InvalidArgumentError(
                f"cannot save {what}: a bytes item resolved to {type(data).__name__}; {_UNCOMMITTED}"
            )
        return data.getbuffer()
    if not isinstance(data, torch.Tensor):
        raise InvalidArgumentError(
            f"cannot save {what}: a tensor item resolved to {type(data).__name__}; {_UNCOMMITTED}"
        )
    return tensor_bytes(data, expected=_item_size(item), what=what)


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def collect_results(
    results: Sequence[Sequence[WriteResult]], url: str
) -> tuple[dict[MetadataIndex, ItemLocation], dict[str, FileRecord]]:
    """Every item's location and every data file's record, from all ranks' write results.

    Raises:
        CorruptCheckpointError: a result carries no ckptio location, or two disagree on one file.
    """
    locations: dict[MetadataIndex, ItemLocation] = {}
    records: dict[str, FileRecord] = {}
    for result in (r for rank_results in results for r in rank_results):
        written = result.storage_data
        if not isinstance(written, WrittenItem):
            raise CorruptCheckpointError(
                f"cannot commit {url!r}: a write result of {result.index.fqn!r} was not made by "
                "ckptio.dcp.StorageWriter; the checkpoint was left uncommitted"
            )
        if records.setdefault(written.file.path, written.file) != written.file:
            raise CorruptCheckpointError(
                f"cannot commit {url!r}: two ranks report different contents for {written.file.path!r}; "
                "the checkpoint was left uncommitted"
            )
        locations[result.index] = written.location
    return locations, records


class StorageWriter(CheckpointTarget, _DCPStorageWriter):
    """Writes a DCP checkpoint to any ckptio storage (local path, ``s3://``, ``gs://``, ``memory://``, ...).

    Args:
        path: the checkpoint directory: a local path, a URL, or a Storage.
        storage_options: fsspec options for the backend (credentials, ``endpoint_url``).
        files_per_rank: data files each rank splits its items into and writes at
            once; by default 4 on object stores and 1 on local disk and in memory.
        commit: write the in-progress marker first and the manifest last (the
            default). ``False`` when the files are part of a larger checkpoint
            whose owner (the checkpoint manager) writes marker and manifest:
            ``finish`` then writes DCP's metadata only, and :attr:`records`
            holds every file written, for that manifest.

    Raises:
        InvalidArgumentError: ``files_per_rank`` is not a positive integer.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        storage_options: dict[str, Any] | None = None,
        *,
        files_per_rank: int | None = None,
        commit: bool = True,
    ) -> None:
        super().__init__(path, storage_options)
        self._commit = commit
        self._claim: SaveClaim | None = None  # the coordinator's claim on the directory
        self.records: list[FileRecord] = []
        if files_per_rank is not None and (
            isinstance(files_per_rank, bool) or not isinstance(files_per_rank, int) or files_per_rank < 1
        ):
            raise InvalidArgumentError(f"files_per_rank must be a positive integer, got {files_per_rank!r}")
        self._files_per_rank = files_per_rank
        self._save_id = uuid.uuid4().hex

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save, into ``checkpoint_id`` when given (a path or URL)."""
        self._retarget(checkpoint_id)
        self._save_id = uuid.uuid4().hex

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self._storage.url, save_id=self._save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise InvalidArgumentError(
                f"cannot save to {self._storage.url!r} with use_collectives=False: ckptio commits a checkpoint "
                "once, from the coordinator, after every rank wrote; nothing was written"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator, before any rank writes: refuse a committed target, write the in-progress marker."""
        if self._commit and is_committed(self._storage):
            raise CheckpointExistsError(
                f"cannot save to {self._storage.url!r}: it already holds a committed checkpoint "
                f"({self._storage.url_of(MANIFEST_NAME)}); it was left untouched and nothing was written; "
                "save to a new directory, or delete that checkpoint first"
            )
        if self._commit:
            self._claim = begin_checkpoint(self._storage, checkpoint_id=None, world_size=len(plans)).keep_alive()
        world = len(plans)
        return [dataclasses.replace(plan, storage_data=RankAssignment(rank, world)) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items into a few data files at once; each is published only when complete."""
        assignment = plan.storage_data
        if not isinstance(assignment, RankAssignment):
            raise InvalidArgumentError(
                f"cannot write to {self._storage.url!r}: the plan was not prepared by this writer's "
                "prepare_global_plan; nothing was written"
            )
        wanted = self._files_per_rank or self._storage.concurrency(DEFAULT_FILES_PER_RANK)
        jobs = list(enumerate(split_items(plan.items, wanted)))
        written = map_concurrently(
            lambda job: self._write_file(data_file_name(assignment.rank, job[0]), job[1], planner),
            jobs,
            workers=self._storage.concurrency(len(jobs)),
            thread_name="ckptio-dcp-write",
        )
        return _done([result for results in written for result in results])

    def _write_file(self, name: str, items: Sequence[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        """Stream ``items`` into data file ``name``, checksummed on the way; nothing is visible unless it completes."""
        writer = ChecksumWriter(self._storage.open_writer(name), name)
        placed: list[tuple[MetadataIndex, ItemLocation]] = []
        with writer:
            for item in items:
                data = _item_bytes(item, planner.resolve_data(item), writer.url)
                placed.append((item.index, ItemLocation(name, writer.bytes_written, data.nbytes)))
                writer.write(data)
                del data
        record = writer.record
        if record is None:  # a ChecksumWriter records on commit
            raise AssertionError(f"{writer.url} committed without a record")
        return [
            WriteResult(index=index, size_in_bytes=loc.length, storage_data=WrittenItem(loc, record))
            for index, loc in placed
        ]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator, after every rank wrote: DCP's metadata, then the manifest (the commit), last."""
        locations, records = collect_results(results, self._storage.url)
        metadata.storage_data = locations
        metadata.storage_meta = self.storage_meta()
        metadata.version = metadata.version or _dcp_version()
        blob = encode_metadata(metadata)
        self._storage.write_bytes(METADATA_NAME, blob)
        records[METADATA_NAME] = FileRecord(METADATA_NAME, len(blob), checksum_bytes(blob))
        self.records = sorted(records.values(), key=lambda r: r.path)
        if not self._commit:
            return
        manifest = CheckpointManifest(
            checkpoint_path=".",
            world_size=max(1, len(results)),
            timestamp=utc_timestamp(),
            files=self.records,
            metadata={"format": FORMAT_NAME, "dcp_metadata": METADATA_NAME, "dcp_version": metadata.version},
        )
        commit_checkpoint(self._storage, manifest, self._claim)
