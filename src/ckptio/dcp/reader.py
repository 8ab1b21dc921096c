"""``ckptio.dcp.StorageReader``: DCP's load from any ckptio storage, trusting only committed checkpoints.

``read_metadata`` makes one listing of the directory and checks it against
the manifest: no manifest means the save never committed
(:class:`~ckptio.errors.IncompleteCheckpointError`), a listed file missing
or of another size is refused before a byte of it is read. ``read_data``
then fetches, per data file, only the byte span each ``ReadItem`` needs,
with several ranged requests and several files in flight; a span that is
exactly the destination tensor's memory is read straight into it, any other
is staged and copied. A data file read from end to end is also checked
against its CRC32C.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader as _DCPStorageReader
from torch.futures import Future

from ckptio.checkpoint.layout import MANIFEST_NAME
from ckptio.checkpoint.validate import inspect_checkpoint
from ckptio.dcp.layout import (
    METADATA_NAME,
    BoxSpan,
    ItemLocation,
    box_span,
    decode_metadata,
    raw_bytes,
)
from ckptio.dcp.target import CheckpointTarget
from ckptio.errors import CorruptCheckpointError, IncompleteCheckpointError
from ckptio.format.ranged_reads import read_into, read_object
from ckptio.storage import Storage
from ckptio.storage.integrity import Crc32c, FileRecord, checksum_bytes
from ckptio.storage.transfer import map_unordered

__all__ = ["StorageReader"]

#: Data files fetched at once on backends that overlap requests (each with its own ranged reads).
FILE_WORKERS = 4
_NOTHING_LOADED = "nothing was loaded and the checkpoint was not modified"


@dataclass
class _Piece:
    """One ReadItem's bytes in a data file, and where they go.

    ``direct`` is the destination itself when the span is exactly its memory
    (read straight into it); otherwise the span is staged in ``buffer`` and copied.
    """

    item: ReadItem
    start: int
    end: int
    dtype: torch.dtype | None = None
    box: BoxSpan | None = None
    target: torch.Tensor | None = None
    direct: torch.Tensor | None = None
    buffer: torch.Tensor | None = None


@dataclass
class _FileRead:
    record: FileRecord
    pieces: list[_Piece] = field(default_factory=list)


def _layers(pieces: Sequence[_Piece]) -> list[list[_Piece]]:
    """Split pieces into groups whose spans do not overlap (one group unless two items share bytes)."""
    layers: list[list[_Piece]] = []
    for piece in sorted(pieces, key=lambda p: (p.start, p.end)):
        layer = next((lay for lay in layers if lay[-1].end <= piece.start), None)
        if layer is None:
            layers.append([piece])
        else:
            layer.append(piece)
    return layers


def _tiles(pieces: Sequence[_Piece], size: int) -> bool:
    """Whether the pieces' spans cover ``[0, size)`` exactly, without gaps or overlaps."""
    position = 0
    for piece in sorted((p for p in pieces if p.end > p.start), key=lambda p: p.start):
        if piece.start != position:
            return False
        position = piece.end
    return position == size


class StorageReader(CheckpointTarget, _DCPStorageReader):
    """Reads a DCP checkpoint written by :class:`ckptio.dcp.StorageWriter` from any ckptio storage.

    Args:
        path: the checkpoint directory: a local path, a URL, or a Storage.
        storage_options: fsspec options for the backend.
        verify_checksums: check the CRC32C of every data file that a load reads
            from end to end (no extra bytes are read for it).
        known_files: the manifest's file records when the caller has already
            read and checked them (the checkpoint manager): no listing then.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        storage_options: dict[str, Any] | None = None,
        *,
        verify_checksums: bool = True,
        known_files: Sequence[FileRecord] | None = None,
    ) -> None:
        super().__init__(path, storage_options)
        self._verify = verify_checksums
        self._known = None if known_files is None else {r.path: r for r in known_files}
        self._reset_state()

    def _reset_state(self) -> None:
        self._load_id = uuid.uuid4().hex
        self._records: dict[str, FileRecord] | None = None
        self._metadata: Metadata | None = None
        self._locations: dict[MetadataIndex, ItemLocation] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load, from ``checkpoint_id`` when given (a path or URL)."""
        self._retarget(checkpoint_id)
        self._reset_state()

    # -- metadata ------------------------------------------------------------
    def check_files(self) -> dict[str, FileRecord]:
        """One listing, checked against the manifest: the manifest's records by path.

        Raises:
            IncompleteCheckpointError: no manifest (the save never committed), or a listed file is missing.
            CorruptCheckpointError: a malformed manifest, or a file whose size is not the listed one.
        """
        url = self._storage.url
        if self._known is not None:
            self._records = self._require_metadata(self._known)
            return self._records
        inspection = inspect_checkpoint(self._storage)
        manifest = inspection.manifest
        if manifest is None:
            raise IncompleteCheckpointError(
                f"cannot load {url!r}: it has no {MANIFEST_NAME}, so its save never committed (crashed or "
                f"still running), or it was not written by ckptio.dcp.StorageWriter; {_NOTHING_LOADED}"
            )
        wrong = [
            f"{self._storage.url_of(r.path)} has {inspection.objects[r.path].size} bytes, the manifest lists {r.size}"
            for r in manifest.files
            if r.path in inspection.objects and inspection.objects[r.path].size != r.size
        ]
        if wrong:
            raise CorruptCheckpointError(
                f"cannot load {url!r}: {'; '.join(wrong[:5])} (truncated or replaced); {_NOTHING_LOADED}"
            )
        missing = [self._storage.url_of(r.path) for r in manifest.files if r.path not in inspection.objects]
        if missing:
            raise IncompleteCheckpointError(f"cannot load {url!r}: {', '.join(missing[:5])} missing; {_NOTHING_LOADED}")
        self._records = self._require_metadata({r.path: r for r in manifest.files})
        return self._records

    def _require_metadata(self, records: dict[str, FileRecord]) -> dict[str, FileRecord]:
        if METADATA_NAME not in records:
            raise CorruptCheckpointError(
                f"cannot load {self._storage.url!r}: its manifest lists no {METADATA_NAME}, so it is not a DCP "
                f"checkpoint written by ckptio; {_NOTHING_LOADED}"
            )
        return records

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's metadata object, after checking every file against the manifest (one listing).

        Raises:
            IncompleteCheckpointError: not committed, or a file is missing.
            CorruptCheckpointError: a file of the wrong size, or metadata that fails its CRC32C.
        """
        if kwargs.get("rank") is not None:
            raise IncompleteCheckpointError(
                f"cannot load {self._storage.url!r}: ckptio writes one global DCP metadata object, "
                f"never one per rank; {_NOTHING_LOADED}"
            )
        record = self.check_files()[METADATA_NAME]
        blob = bytes(read_object(self._storage, METADATA_NAME, size=record.size))
        url = self._storage.url_of(METADATA_NAME)
        if len(blob) != record.size or checksum_bytes(blob) != record.crc32c:
            raise CorruptCheckpointError(
                f"cannot load {url!r}: its bytes do not match the CRC32C the manifest lists; {_NOTHING_LOADED}"
            )
        metadata = decode_metadata(blob, url)
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self._load_id
        self._metadata = metadata
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        locations = metadata.storage_data
        if not isinstance(locations, dict) or not all(isinstance(v, ItemLocation) for v in locations.values()):
            raise CorruptCheckpointError(
                f"cannot load {self._storage.url!r}: its DCP metadata was not written by ckptio.dcp.StorageWriter; "
                f"{_NOTHING_LOADED}"
            )
        self._metadata = metadata
        self._locations = locations

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    # -- data ------------------------------------------------------------------
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fetch the byte span of every item of ``plan``, several files at once, and hand them to ``planner``.

        Planner calls (``resolve_tensor``, ``load_bytes``, ``commit_tensor``) stay on the calling thread.
        """
        records = self._records if self._records is not None else self.check_files()
        reads: dict[str, _FileRead] = {}
        for item in plan.items:
            location = self._location(item.storage_index)
            file_read = reads.get(location.file)
            if file_read is None:
                file_read = reads[location.file] = _FileRead(self._record(records, location))
            file_read.pieces.append(self._piece(item, location, planner))
        files = list(reads.values())
        for file_read in map_unordered(self._fetch, files, workers=self._storage.concurrency(FILE_WORKERS)):
            self._deliver(file_read, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _location(self, index: MetadataIndex) -> ItemLocation:
        location = self._locations.get(index)
        if location is None:
            raise CorruptCheckpointError(
                f"cannot load {self._storage.url!r}: its DCP metadata has no location for {index.fqn!r} "
                f"(offset {index.offset}); {_NOTHING_LOADED}"
            )
        return location

    def _record(self, records: dict[str, FileRecord], location: ItemLocation) -> FileRecord:
        record = records.get(location.file)
        inside = record is not None and 0 <= location.offset <= location.offset + location.length <= record.size
        if record is None or not inside:
            raise CorruptCheckpointError(
                f"cannot load {self._storage.url_of(location.file)!r}: the DCP metadata places an item at bytes "
                f"[{location.offset}, {location.offset + location.length}) but the manifest "
                f"{'does not list the file' if record is None else f'lists {record.size} bytes'}; {_NOTHING_LOADED}"
            )
        return record

    def _stored_chunk(self, index: MetadataIndex) -> tuple[torch.dtype, torch.Size]:
        """dtype and shape of the stored tensor chunk ``index``, from the DCP metadata."""
        entry = self._metadata.state_dict_metadata.get(index.fqn) if self._metadata is not None else None
        if isinstance(entry, TensorStorageMetadata):
            for chunk in entry.chunks:
                if chunk.offsets == index.offset:
                    return entry.properties.dtype, chunk.sizes
        raise CorruptCheckpointError(
            f"cannot load {self._storage.url!r}: its DCP metadata has no tensor chunk {index.fqn!r} at "
            f"{index.offset}; {_NOTHING_LOADED}"
        )

    def _piece(self, item: ReadItem, location: ItemLocation, planner: LoadPlanner) -> _Piece:
        """Where ``item``'s bytes are, and (for a tensor) its resolved destination."""
        end = location.offset + location.length
        if item.type == LoadItemType.BYTE_IO:
            return _Piece(item, location.offset, end)
        dtype, chunk = self._stored_chunk(item.storage_index)
        if location.length != chunk.numel() * dtype.itemsize:
            raise CorruptCheckpointError(
                f"cannot load {self._storage.url_of(location.file)!r}: {item.storage_index.fqn!r} takes "
                f"{location.length} bytes, but a {dtype} chunk of shape {list(chunk)} takes "
                f"{chunk.numel() * dtype.itemsize}; {_NOTHING_LOADED}"
            )
        try:
            box = box_span(chunk, item.storage_offsets, item.lengths, dtype.itemsize)
        except CorruptCheckpointError as exc:
            url = self._storage.url_of(location.file)
            message = f"cannot load {item.storage_index.fqn!r} from {url!r}: {exc}; {_NOTHING_LOADED}"
            raise exc.with_message(message) from None
        target = planner.resolve_tensor(item).detach()
        piece = _Piece(item, location.offset + box.start, location.offset + box.end, dtype, box, target)
        if (
            box.contiguous
            and target.device.type == "cpu"
            and target.dtype == dtype
            and target.is_contiguous()
            and target.layout == torch.strided
            and tuple(target.shape) == tuple(item.lengths)
        ):
            piece.direct = target
        return piece

    def _fetch(self, file_read: _FileRead) -> _FileRead:
        """Read every piece's span of one data file (ranged reads in flight); check its CRC32C when whole.

        Runs on a worker thread; touches only memory, never the planner.
        """
        key = file_read.record.path
        for piece in file_read.pieces:
            if piece.direct is None:
                piece.buffer = torch.empty(piece.end - piece.start, dtype=torch.uint8)
        for layer in _layers(file_read.pieces):
            read_into(self._storage, key, [(p.start, raw_bytes(self._destination(p))) for p in layer])
        if self._verify and _tiles(file_read.pieces, file_read.record.size):
            self._check_crc(file_read)
        return file_read

    @staticmethod
    def _destination(piece: _Piece) -> torch.Tensor:
        destination = piece.direct if piece.direct is not None else piece.buffer
        if destination is None:
            raise AssertionError("a piece has neither a destination nor a buffer")
        return destination

    def _check_crc(self, file_read: _FileRead) -> None:
        crc = Crc32c()
        for piece in sorted(file_read.pieces, key=lambda p: p.start):
            crc.update(raw_bytes(self._destination(piece)))
        if crc.hexdigest() != file_read.record.crc32c:
            raise CorruptCheckpointError(
                f"cannot load {self._storage.url_of(file_read.record.path)!r}: CRC32C {crc.hexdigest()}, the "
                f"manifest lists {file_read.record.crc32c} (corrupt); the state dict may hold part of it and must "
                "not be used; the checkpoint was not modified"
            )

    def _deliver(self, file_read: _FileRead, planner: LoadPlanner) -> None:
        """Hand one file's fetched pieces to the planner (calling thread)."""
        for piece in file_read.pieces:
            if piece.target is None:
                planner.load_bytes(piece.item, io.BytesIO(raw_bytes(self._destination(piece)).tobytes()))
                continue
            if piece.direct is None:
                piece.target.copy_(self._staged_view(piece))
            planner.commit_tensor(piece.item, piece.target)
            piece.buffer = piece.direct = None

    @staticmethod
    def _staged_view(piece: _Piece) -> torch.Tensor:
        """The staged span of a piece seen as its box of the stored chunk."""
        if piece.buffer is None or piece.box is None or piece.dtype is None:
            raise AssertionError("a staged piece lacks its buffer, box or dtype")
        if piece.end == piece.start:
            return torch.empty(tuple(piece.item.lengths), dtype=piece.dtype)
        return piece.buffer.view(piece.dtype).as_strided(tuple(piece.item.lengths), piece.box.strides, 0)
