"""Progress of saves, loads and copies: ``CheckpointConfig(progress=...)`` and ``copy_checkpoint(progress=...)``."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import ckptio
from ckptio.checkpoint import MANIFEST_NAME, read_manifest
from ckptio.checkpoint.copy import copy_checkpoint
from ckptio.storage import ProgressEvent, open_storage
from ckptio.storage.progress import ProgressCounter, TqdmProgress, progress_callback

pytestmark = pytest.mark.timeout(300)


class _Trainer:
    def __init__(self, model: torch.nn.Module) -> None:
        self.optimizer = torch.optim.Adam(model.parameters())
        model(torch.randn(2, 64)).sum().backward()
        self.optimizer.step()
        self.progress = ckptio.TrainingProgress()

    def get_state_components(self) -> list[ckptio.StateComponent]:
        return [
            ckptio.StateComponent("optimizer", self.optimizer, ckptio.SharingPattern.REPLICATED),
            ckptio.StateComponent("progress", self.progress, ckptio.SharingPattern.GLOBAL),
        ]


def _manager(url: str, options: dict[str, Any], **config: Any) -> ckptio.CheckpointManager:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    cfg = ckptio.CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=10_000, **config)
    return ckptio.CheckpointManager(cfg, _Trainer(model), model=model)


def _check(
    events: list[ProgressEvent],
    operation: str,
    url: str,
    total: int,
    bytes_total: int | None,
) -> None:
    assert events, "no progress reported"
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] == total
    assert {(e.operation, e.url, e.bytes_total) for e in events} == {(operation, url, bytes_total)}


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_save_load_and_copy_report_every_byte_of_the_checkpoint(
    backend_url: Any,
) -> None:
    opts = backend_url.storage_options
    events: list[ProgressEvent] = []
    manager = _manager(backend_url.url, opts, progress=events.append)

    path = manager.save_checkpoint()
    manifest = read_manifest(open_storage(path, **opts))
    assert len(manifest.files) >= 4  # shards, index, optimizer and progress state
    _check(events, "save", path, manifest.total_size, None)

    events.clear()
    manager.load_checkpoint(path)
    _check(events, "load", path, manifest.total_size, manifest.total_size)

    events.clear()
    result = copy_checkpoint(path, f"{backend_url.url}/copy", storage_options=opts, progress=events.append)
    manifest_size = len(open_storage(path, **opts).read_bytes(MANIFEST_NAME))
    assert result.bytes_copied == manifest.total_size + manifest_size
    _check(events, "copy", result.url, result.bytes_copied, result.bytes_copied)


def test_progress_is_off_by_default(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    shown: list[Any] = []
    monkeypatch.setattr(
        "ckptio.storage.progress.TqdmProgress.__call__",
        lambda self, event: shown.append(event),
    )
    manager = _manager(str(tmp_path), {})

    assert manager.config.progress is False
    manager.load_checkpoint(manager.save_checkpoint())
    assert shown == []
    assert type(manager._checkpoint_storage(str(tmp_path / "checkpoints" / "x"))).__name__ == "RetryingStorage"


def test_true_asks_for_a_bar_only_on_rank_0_of_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert progress_callback(True) is None
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert isinstance(progress_callback(True), TqdmProgress)
    assert progress_callback(True, rank=1) is None
    assert progress_callback(False) is None and progress_callback(None) is None
    callback = print
    assert progress_callback(callback, rank=3) is callback


def test_tqdm_bar_follows_the_events() -> None:
    tqdm = pytest.importorskip("tqdm").tqdm
    stream = io.StringIO()
    bar = TqdmProgress(lambda **kw: tqdm(**{**kw, "file": stream, "leave": True}), "save")
    for done in (10, 60, 100):
        bar(ProgressEvent("save", "memory://x", done, 100))
    assert "save" in stream.getvalue() and "100/100" in stream.getvalue()


def test_counter_counts_a_rewritten_object_once_and_caps_reads_at_known_sizes() -> None:
    events: list[ProgressEvent] = []
    writes = ProgressCounter("save", "u", events.append, ignore={"u/marker"})
    writes.reached("u/a", 50)
    writes.reached("u/a", 20)  # a second attempt from scratch: nothing new
    writes.reached("u/a", 80)
    writes.reached("u/marker", 999)
    assert [e.bytes_done for e in events] == [50, 80]

    events.clear()
    reads = ProgressCounter("load", "u", events.append, total=100, sizes={"u/a": 60, "u/b": 40})
    reads.add("u/a", 40)
    reads.add("u/a", 40)  # a header read twice: capped at the size
    reads.add("u/other", 500)  # not a file of the checkpoint
    reads.add("u/b", 40)
    assert [e.bytes_done for e in events] == [40, 60, 100] and reads.bytes_done == 100
