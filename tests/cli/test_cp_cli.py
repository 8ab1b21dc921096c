"""``ckptio cp``: resumable, never a destination that validates with mixed content, server-side on one store."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
import ckptio.checkpoint.copy
from ckptio.checkpoint import (
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    validate_checkpoint,
    verify_checkpoint,
)
from ckptio.checkpoint.copy import copy_checkpoint
from ckptio.cli import main
from ckptio.errors import InjectedFault, SimulatedCrash
from ckptio.storage import FaultInjectingStorage, Storage, open_storage


class _Serial(FaultInjectingStorage):
    """Faults at one point whatever the backend: one object in flight at a time."""

    def concurrency(self, wanted: int) -> int:
        return 1


class _CrashOnOpen(_Serial):
    """Dies when it is asked to open its ``after + 1``-th stream."""

    def __init__(self, inner: Storage, *, after: int) -> None:
        super().__init__(inner)
        self.left = after

    def open_writer(self, key: str) -> Any:
        if self.left == 0:
            raise SimulatedCrash(f"simulated crash opening {key}")
        self.left -= 1
        return super().open_writer(key)


def _save(url: str, options: dict[str, Any], *, shift: float = 0.0, max_shard_size: int = 1200) -> str:
    """A checkpoint of four 16x16 layers (four shards, an index, a manifest); ``shift`` changes the values only."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    cfg = ckptio.CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=max_shard_size)
    return ckptio.CheckpointManager(cfg, None, model=model).save_checkpoint()


def _data_keys(storage: Storage) -> set[str]:
    return {k for k in storage.walk("") if k not in (MANIFEST_NAME, IN_PROGRESS_NAME)}


def _written(log: list[str]) -> list[str]:
    """Keys an operation log shows written (streams opened, whole objects written or created)."""
    return [entry.split(" ", 1)[1] for entry in log if entry.split(" ", 1)[0] in ("open", "write", "create")]


def _state(dst: Storage, old: bytes, new: bytes) -> str:
    """``"old"``/``"new"`` when ``dst`` validates as complete (then every byte matches that manifest), else ``"incomplete"``."""
    if not validate_checkpoint(dst):
        return "incomplete"
    assert verify_checkpoint(dst) == [], "a destination that validates holds mixed content"
    manifest = dst.read_bytes(MANIFEST_NAME)
    assert manifest in (old, new)
    return "old" if manifest == old else "new"


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_rerun_after_interruption_copies_only_what_is_missing(
    backend_url: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _save(str(tmp_path / "run"), {})
    src = open_storage(source)
    dst_url = f"{backend_url.url}/copy"
    dst = open_storage(dst_url, **backend_url.storage_options)
    half = sum(src.size(k) for k in _data_keys(src)) // 2

    with pytest.raises(InjectedFault):
        copy_checkpoint(src, _Serial(dst, fail_after_bytes=half))

    assert not validate_checkpoint(dst)
    present = _data_keys(dst)
    assert 0 < len(present) < len(_data_keys(src)), present
    logged = FaultInjectingStorage(dst)  # no faults: it only logs what the re-run does
    result = copy_checkpoint(src, logged)

    assert sorted(_written(logged.log)) == sorted([*(_data_keys(src) - present), MANIFEST_NAME])
    assert set(result.reused) == present
    assert verify_checkpoint(dst) == [] and dst.walk("") == src.walk("")

    # The command line resumes too, without --overwrite: a second interruption, then `ckptio cp`.
    dst.delete_prefix("")
    with pytest.raises(InjectedFault):
        copy_checkpoint(src, _Serial(dst, fail_after_bytes=half))
    present = _data_keys(dst)
    code = main(["cp", source, dst_url, "--dst-storage-options", json.dumps(backend_url.storage_options)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{len(present)} files already there" in out
    assert verify_checkpoint(dst) == []


def test_rerun_reuses_objects_written_after_its_marker_without_reading_them(tmp_path: Path) -> None:
    """An object published after the copy's own marker is trusted; one from before is read back and compared."""
    src = open_storage(_save(str(tmp_path / "run"), {}))
    dst = open_storage(str(tmp_path / "copy"))
    with pytest.raises(InjectedFault):
        copy_checkpoint(src, _Serial(dst, fail_after_bytes=sum(src.size(k) for k in _data_keys(src)) // 2))
    marker_mtime = os.stat(tmp_path / "copy" / IN_PROGRESS_NAME).st_mtime
    newer, older = sorted(_data_keys(dst))[:2]
    os.utime(tmp_path / "copy" / newer, (marker_mtime + 60, marker_mtime + 60))
    stale = bytearray((tmp_path / "copy" / older).read_bytes())
    stale[-1] ^= 0xFF  # same size, other content: what an older copy of another checkpoint could leave
    (tmp_path / "copy" / older).write_bytes(bytes(stale))
    os.utime(tmp_path / "copy" / older, (marker_mtime - 60, marker_mtime - 60))

    logged = FaultInjectingStorage(dst)
    result = copy_checkpoint(src, logged)

    reads = {entry.split(" ", 1)[1] for entry in logged.log if entry.startswith("read ")}
    assert newer not in reads and newer in result.reused
    assert older in reads and older in _written(logged.log)
    assert verify_checkpoint(dst) == []


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_overwrite_interrupted_anywhere_never_validates_with_mixed_content(backend_url: Any, tmp_path: Path) -> None:
    """A crash at every operation of ``cp --overwrite`` onto a committed copy of another checkpoint
    (same file names, same sizes, other bytes) leaves the old checkpoint or an incomplete one."""
    old_src = open_storage(_save(str(tmp_path / "old"), {}))
    new_src = open_storage(_save(str(tmp_path / "new"), {}, shift=1.0))
    assert {k: old_src.size(k) for k in old_src.walk("")} == {k: new_src.size(k) for k in new_src.walk("")}
    old, new = old_src.read_bytes(MANIFEST_NAME), new_src.read_bytes(MANIFEST_NAME)
    dst = open_storage(f"{backend_url.url}/copy", **backend_url.storage_options)
    copy_checkpoint(old_src, dst)

    states: list[tuple[int, str]] = []
    crash_after = 0
    while True:  # until a run gets through: every operation on local disk, every third on S3
        try:
            copy_checkpoint(new_src, _Serial(dst, fail_after_ops=crash_after, crash=True), overwrite=True)
        except SimulatedCrash:
            states.append((crash_after, _state(dst, old, new)))
            copy_checkpoint(old_src, dst, overwrite=True)
            assert _state(dst, old, new) == "old"
            crash_after += 1 if backend_url.name == "local" else 3
            continue
        break
    assert _state(dst, old, new) == "new"

    order = {"old": 0, "incomplete": 1, "new": 2}
    seen = [state for _, state in states]
    assert "old" in seen and "incomplete" in seen, states
    assert seen == sorted(seen, key=order.__getitem__), states  # old, then incomplete, then new: never back
    # A crash after two files were replaced, then a plain re-run: it resumes (only the two others and
    # the manifest are written) and commits the new checkpoint.
    copy_checkpoint(old_src, dst, overwrite=True)
    with pytest.raises(SimulatedCrash):
        copy_checkpoint(new_src, _CrashOnOpen(dst, after=2), overwrite=True)
    assert _state(dst, old, new) == "incomplete"
    logged = FaultInjectingStorage(dst)
    copy_checkpoint(new_src, logged)
    assert len(_written(logged.log)) == 3 and _written(logged.log)[-1] == MANIFEST_NAME, logged.log
    assert _state(dst, old, new) == "new"


def test_overwrite_keeps_the_old_checkpoint_valid_while_writing_new_names(tmp_path: Path) -> None:
    """Files the old manifest does not list are written before it is retired."""
    old_src = open_storage(_save(str(tmp_path / "old"), {}, max_shard_size=1200))
    new_src = open_storage(_save(str(tmp_path / "new"), {}, shift=1.0, max_shard_size=10**6))
    old, new = old_src.read_bytes(MANIFEST_NAME), new_src.read_bytes(MANIFEST_NAME)
    fresh = _data_keys(new_src) - _data_keys(old_src)
    assert fresh and _data_keys(new_src) & _data_keys(old_src)  # new shard names, and the index in common
    dst = open_storage(str(tmp_path / "copy"))
    copy_checkpoint(old_src, dst)

    seen = []
    for crash_after in range(1, 30):
        faulty = _Serial(dst, fail_after_ops=crash_after, crash=True)
        try:
            copy_checkpoint(new_src, faulty, overwrite=True)
        except SimulatedCrash:
            seen.append((_state(dst, old, new), fresh <= _data_keys(dst)))
            copy_checkpoint(old_src, dst, overwrite=True)
            continue
        break
    assert ("old", True) in seen, seen  # the new shard is written, the old checkpoint still verifies
    assert _state(dst, old, new) == "new"
    assert _data_keys(dst) == _data_keys(new_src)  # the old shards went after the commit


@pytest.mark.parametrize("backend_url", ["memory", "s3", "gcs"], indirect=True)
def test_copy_on_one_store_is_server_side(
    backend_url: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = backend_url.storage_options
    source = _save(backend_url.url, opts)
    src = open_storage(source, **opts)
    fs = src.inner.fs  # type: ignore[attr-defined]
    copied: list[tuple[str, str]] = []
    real = fs.cp_file

    def spy(path1: str, path2: str, **kwargs: Any) -> Any:
        copied.append((path1, path2))
        return real(path1, path2, **kwargs)

    def no_streaming(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("streamed an object that the store could copy")

    monkeypatch.setattr(fs, "cp_file", spy)
    monkeypatch.setattr(ckptio.checkpoint.copy, "copy_object", no_streaming)
    dst_url = f"{backend_url.url}/backup/checkpoint-1"

    code = main(["--storage-options", json.dumps(opts), "cp", source, dst_url])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p2.rsplit("/", 1)[1] for _, p2 in copied) == sorted(_data_keys(src))
    assert all(p1.endswith(p2.rsplit("/", 1)[1]) for p1, p2 in copied)
    assert verify_checkpoint(dst_url, storage_options=opts) == []


def test_copy_across_stores_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _save(str(tmp_path / "run"), {})
    dst_url = f"memory://ckptio-test/{tmp_path.name}/copy"
    streamed: list[str] = []
    real = ckptio.checkpoint.copy.copy_object
    monkeypatch.setattr(
        ckptio.checkpoint.copy, "copy_object", lambda s, d, key, *a, **k: streamed.append(key) or real(s, d, key, *a, **k)
    )
    try:
        result = copy_checkpoint(source, dst_url)
        assert result.server_side == () and sorted(streamed) == sorted(_data_keys(open_storage(source)))
        assert verify_checkpoint(dst_url) == []
    finally:
        open_storage(dst_url).delete_prefix("")


def test_progress_bar_only_on_a_terminal_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _save(str(tmp_path / "run"), {})

    def run(*flags: str, tty: bool) -> str:
        monkeypatch.setattr("sys.stderr.isatty", lambda: tty)
        target = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        assert main(["cp", source, str(target), *flags]) == 0
        assert main(["export", source, str(target) + "-hf", *flags]) == 0
        return capsys.readouterr().err

    assert run(tty=False) == ""
    assert run("--no-progress", tty=True) == ""
    for err in (run(tty=True), run("--progress", tty=False)):
        assert "cp: 100%" in err and "export: " in err, err


@pytest.mark.parametrize("backend_url", ["s3"], indirect=True)
def test_copy_to_an_object_store_moves_several_objects_at_once(
    backend_url: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _save(str(tmp_path / "run"), {})
    real = ckptio.checkpoint.copy.copy_object
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most

    def slow(*args: Any, **kwargs: Any) -> int:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        try:
            time.sleep(0.2)
            return real(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(ckptio.checkpoint.copy, "copy_object", slow)
    dst = f"{backend_url.url}/copy"
    copy_checkpoint(source, dst, dst_storage_options=backend_url.storage_options)
    assert in_flight[1] >= 2
    assert verify_checkpoint(dst, storage_options=backend_url.storage_options) == []
