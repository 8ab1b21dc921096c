"""ckptio.dcp without a process group (``no_dist=True``): round trips, commit, refusals, crashes."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from dcp_helpers import differing, leaves, make_state  # noqa: E402

import ckptio.dcp  # noqa: E402
from ckptio.checkpoint import (  # noqa: E402
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    validate_checkpoint,
    verify_checkpoint,
)
from ckptio.dcp.layout import METADATA_NAME, box_span  # noqa: E402
from ckptio.errors import (  # noqa: E402
    CheckpointExistsError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
)
from ckptio.storage import (  # noqa: E402
    FaultInjectingStorage,
    LocalStorage,
    Storage,
    StorageWrapper,
    open_storage,
)
from ckptio.storage.integrity import checksum_object  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_no_dist() -> Iterator[None]:
    with warnings.catch_warnings():
        # DCP warns that it assumes one process when no process group is initialised.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def _save(state: dict[str, Any], target: str | Storage, options: dict[str, Any] | None = None, **kw: Any) -> None:
    dcp.save(state, storage_writer=ckptio.dcp.StorageWriter(target, options, **kw), no_dist=True)


def _load(state: dict[str, Any], target: str | Storage, options: dict[str, Any] | None = None) -> None:
    dcp.load(state, storage_reader=ckptio.dcp.StorageReader(target, options), no_dist=True)


def _failure(info: pytest.ExceptionInfo[CheckpointException]) -> BaseException:
    """The exception DCP wrapped (it reports every rank's; there is one rank here)."""
    failures = info.value.failures
    assert list(failures) == [0]
    return failures[0][0]


def _data_files(storage: Storage) -> list[str]:
    return sorted(k for k in storage.walk("") if k.endswith(".distcp"))


def test_round_trip_no_dist(backend_url: Any) -> None:
    saved, fresh = make_state(0), make_state(1)
    assert set(differing(saved, fresh)) == set(leaves(saved)) - {"empty"}  # all differ before the load
    _save(saved, backend_url.url, backend_url.storage_options, files_per_rank=3)
    _load(fresh, backend_url.url, backend_url.storage_options)
    assert differing(saved, fresh) == []
    storage = open_storage(backend_url.url, **backend_url.storage_options)
    assert len(_data_files(storage)) == 3
    assert validate_checkpoint(storage)
    assert verify_checkpoint(storage) == []


def test_manifest_lists_every_file_with_size_and_crc(tmp_path: Path) -> None:
    _save(make_state(0), str(tmp_path), files_per_rank=2)
    storage = LocalStorage(str(tmp_path))
    manifest = json.loads(storage.read_bytes(MANIFEST_NAME))
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == {*_data_files(storage), METADATA_NAME}
    assert set(storage.walk("")) == {*files, MANIFEST_NAME}  # and the in-progress marker is gone
    for path, record in files.items():
        assert checksum_object(storage, path).to_json() == record
    assert manifest["world_size"] == 1
    assert manifest["metadata"]["format"] == "torch.distributed.checkpoint"


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_directory_without_manifest_is_incomplete_and_refused(backend_url: Any) -> None:
    storage = open_storage(backend_url.url, **backend_url.storage_options)
    _save(make_state(0), storage)
    storage.delete(MANIFEST_NAME)  # a crash just before the commit
    assert not validate_checkpoint(storage)
    assert verify_checkpoint(storage) != []
    with pytest.raises(IncompleteCheckpointError, match=MANIFEST_NAME) as info:
        ckptio.dcp.StorageReader(storage).read_metadata()
    assert storage.url in str(info.value)
    fresh = make_state(1)
    with pytest.raises(CheckpointException, match="never committed"):
        _load(fresh, storage)
    assert differing(make_state(1), fresh) == []  # nothing was loaded


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_truncated_data_file_is_refused_naming_it(backend_url: Any) -> None:
    storage = open_storage(backend_url.url, **backend_url.storage_options)
    _save(make_state(0), storage)
    victim = _data_files(storage)[0]
    storage.write_bytes(victim, storage.read_bytes(victim)[:-3])
    assert not validate_checkpoint(storage)
    with pytest.raises(CorruptCheckpointError, match="the manifest lists") as info:
        ckptio.dcp.StorageReader(storage).read_metadata()
    assert storage.url_of(victim) in str(info.value)
    fresh = make_state(1)
    with pytest.raises(CheckpointException) as wrapped:
        _load(fresh, storage)
    assert storage.url_of(victim) in str(wrapped.value)
    assert differing(make_state(1), fresh) == []


def test_corrupt_data_file_fails_its_crc(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    _save(make_state(0), storage)
    victim = _data_files(storage)[0]
    data = bytearray(storage.read_bytes(victim))
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    storage.write_bytes(victim, bytes(data))
    with pytest.raises(CheckpointException) as info:
        _load(make_state(1), storage)
    error = _failure(info)
    assert isinstance(error, CorruptCheckpointError) and "CRC32C" in str(error)
    assert storage.url_of(victim) in str(error)
    assert any(victim in problem for problem in verify_checkpoint(storage))


def test_save_refuses_a_committed_checkpoint_and_leaves_it_untouched(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    _save(make_state(0), storage)
    before = {o.key: o for o in storage.list_objects("")}
    with pytest.raises(CheckpointException) as info:
        _save(make_state(1), storage)
    error = _failure(info)
    assert isinstance(error, CheckpointExistsError) and storage.url in str(error)
    assert {o.key: o for o in storage.list_objects("")} == before
    fresh = make_state(2)
    _load(fresh, storage)
    assert differing(make_state(0), fresh) == []


def test_crash_at_any_step_leaves_an_incomplete_or_a_whole_checkpoint(tmp_path: Path) -> None:
    outcomes = []
    for ops in range(60):
        target = tmp_path / f"crash-{ops}"
        faulty = FaultInjectingStorage(LocalStorage(str(target)), fail_after_ops=ops, crash=True)
        try:
            _save(make_state(0), faulty)
        except CheckpointException as exc:
            assert [type(e) for e, _ in exc.failures.values()] == [ckptio.errors.SimulatedCrash]
        complete = validate_checkpoint(str(target))
        outcomes.append(complete)
        if complete:
            fresh = make_state(1)
            _load(fresh, str(target))
            assert differing(make_state(0), fresh) == []
        else:
            with pytest.raises((IncompleteCheckpointError, CorruptCheckpointError)):
                ckptio.dcp.StorageReader(str(target)).read_metadata()
        if not faulty.tripped:
            break
    assert outcomes[-1] and not faulty.tripped  # the last save ran to the end
    assert outcomes.count(False) >= 5  # many crash points, each before the commit, none looked complete
    # A crashed directory (marker and data, no manifest) can be saved into again.
    crashed = next(tmp_path / f"crash-{i}" for i, ok in enumerate(outcomes) if not ok and i > 2)
    assert (crashed / IN_PROGRESS_NAME).exists()
    _save(make_state(0), str(crashed))
    assert validate_checkpoint(str(crashed)) and not (crashed / IN_PROGRESS_NAME).exists()


class _RecordingStorage(StorageWrapper):
    """Records every ranged read that goes through it."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.reads: list[tuple[str, int | None, int | None]] = []

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self.reads.append((key, start, end))
        return super().read_bytes(key, start, end)


def test_load_reads_only_the_byte_ranges_it_needs(tmp_path: Path) -> None:
    big, small = torch.randn(256, 256), torch.arange(4, dtype=torch.int16)
    _save({"big": big, "small": small, "after": torch.ones(3)}, str(tmp_path), files_per_rank=1)
    recording = _RecordingStorage(LocalStorage(str(tmp_path)))
    wanted = {"small": torch.zeros(4, dtype=torch.int16)}
    _load(wanted, recording)
    assert torch.equal(wanted["small"], small)
    data_reads = [r for r in recording.reads if r[0].endswith(".distcp")]
    assert len(data_reads) == 1 and data_reads[0][2] - data_reads[0][1] == small.nbytes


def test_box_span_maps_sub_boxes_to_byte_spans() -> None:
    # A (4, 6) chunk of 2-byte elements: rows 1..2 are one contiguous span, columns 2..3 are not.
    rows = box_span((4, 6), (1, 0), (2, 6), 2)
    assert (rows.start, rows.end, rows.strides, rows.contiguous) == (12, 36, (6, 1), True)
    cols = box_span((4, 6), (0, 2), (4, 2), 2)
    assert (cols.start, cols.end, cols.contiguous) == (4, 44, False)
    assert box_span((), (), (), 4) == box_span((), (), (), 4) and box_span((), (), (), 4).end == 4
    assert box_span((3, 0), (0, 0), (3, 0), 4).end == 0
    with pytest.raises(CorruptCheckpointError):
        box_span((4, 6), (3, 0), (2, 6), 2)


def test_checkpoint_id_selects_the_directory(tmp_path: Path) -> None:
    writer = ckptio.dcp.StorageWriter(str(tmp_path / "unused"))
    dcp.save(make_state(0), checkpoint_id=str(tmp_path / "chosen"), storage_writer=writer, no_dist=True)
    assert validate_checkpoint(str(tmp_path / "chosen")) and not (tmp_path / "unused").exists()
    fresh = make_state(1)
    reader = ckptio.dcp.StorageReader("/nowhere")
    dcp.load(fresh, checkpoint_id=tmp_path / "chosen", storage_reader=reader, no_dist=True)
    assert differing(make_state(0), fresh) == []
    for cls in (ckptio.dcp.StorageWriter, ckptio.dcp.StorageReader):
        assert cls.validate_checkpoint_id("s3://bucket/x") and cls.validate_checkpoint_id(tmp_path)
        assert not cls.validate_checkpoint_id("no-such-protocol://x")


def test_files_per_rank_must_be_positive(tmp_path: Path) -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidArgumentError, match="files_per_rank"):
            ckptio.dcp.StorageWriter(str(tmp_path), files_per_rank=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend_url", ["s3"], indirect=True)
def test_large_tensors_round_trip_through_concurrent_ranged_reads(backend_url: Any) -> None:
    g = torch.Generator().manual_seed(5)
    saved = {"a": torch.randn(6 * 2**20, generator=g), "b": torch.randn(3 * 2**20, generator=g).half()}  # 24 + 6 MiB
    storage = open_storage(backend_url.url, **backend_url.storage_options)
    _save(saved, storage)  # two files (the default on object stores: up to 4 per rank)
    assert len(_data_files(storage)) == 2
    recording = _RecordingStorage(storage)
    fresh = {"a": torch.zeros_like(saved["a"]), "b": torch.zeros_like(saved["b"])}
    _load(fresh, recording)
    assert differing(saved, fresh) == []
    ranges = sorted((r[1], r[2]) for r in recording.reads if r[0].endswith(".distcp"))
    assert len(ranges) > 2  # the 24 MiB file came as several ranges
    # Each byte once, nothing more: the ranges tile exactly the tensors' bytes.
    assert sum(end - start for start, end in ranges) == sum(t.nbytes for t in saved.values())
