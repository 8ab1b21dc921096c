"""The Hugging Face Trainer integration: CkptioCallback commits and rotates, fetch_latest_checkpoint resumes."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState
from transformers_helpers import (
    MAX_STEPS,
    SAVE_STEPS,
    GatedStorage,
    fake_checkpoint,
    read_tree,
    train,
    training_args,
)

from ckptio.checkpoint import (
    MANIFEST_NAME,
    find_latest_checkpoint,
    list_checkpoints,
    read_manifest,
    verify_checkpoint,
)
from ckptio.errors import (
    CorruptCheckpointError,
    InjectedFault,
    SimulatedCrash,
    StorageError,
)
from ckptio.integrations.transformers import (
    STAGING_DIR,
    CkptioCallback,
    fetch_latest_checkpoint,
)
from ckptio.storage import FaultInjectingStorage, LocalStorage, Storage, open_storage

STOP_AT = 9  # the "crash": after the checkpoint of step 8, before the one of step 12
#: The Trainer runs on these backends (memory adds nothing the cheap tests below do not cover).
TRAINER_BACKENDS = ["local", "s3", "gcs"]


def _open(target: Any) -> Storage:
    return open_storage(target.url, **target.storage_options)


def _names(storage: Storage) -> list[tuple[str, bool]]:
    return [(e.name, e.is_complete) for e in list_checkpoints(storage)]


def _save(callback: CkptioCallback, output_dir: Path, step: int, *, limit: int | None = 1) -> dict[str, bytes]:
    """What the Trainer does at a save: write ``checkpoint-<step>`` locally, then call ``on_save``."""
    files = fake_checkpoint(output_dir, step)
    state = TrainerState(global_step=step)
    callback.on_save(training_args(output_dir, save_total_limit=limit), state, TrainerControl())
    return files


def _end(callback: CkptioCallback, output_dir: Path) -> None:
    callback.on_train_end(training_args(output_dir), TrainerState(), TrainerControl())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses of an uninterrupted run, step by step."""
    losses, trainer = train(tmp_path_factory.mktemp("reference"))
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert trainer.state.global_step == MAX_STEPS
    return losses


def test_control_plain_trainer_resume_matches_uninterrupted_run(tmp_path: Path, reference: dict[int, float]) -> None:
    """Without ckptio, a local resume from checkpoint-8 repeats the uninterrupted run's losses exactly:
    the setup the remote test relies on."""
    interrupted, _ = train(tmp_path, stop_at=STOP_AT)
    assert interrupted == {s: reference[s] for s in range(1, STOP_AT + 1)}
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-8"]
    resumed, trainer = train(tmp_path, resume=str(tmp_path / "checkpoint-8"))
    assert trainer.state.global_step == MAX_STEPS
    assert resumed == {s: reference[s] for s in range(2 * SAVE_STEPS + 1, MAX_STEPS + 1)}


@pytest.mark.parametrize("backend_url", TRAINER_BACKENDS, indirect=True)
def test_trainer_commits_rotates_and_resumes_from_remote(
    backend_url: Any, tmp_path: Path, reference: dict[int, float]
) -> None:
    """Train with the callback, lose the local disk, fetch, resume: same step, same losses."""
    storage = _open(backend_url)
    output_dir = tmp_path / "run"
    callback = CkptioCallback(backend_url.url, backend_url.storage_options)
    interrupted, _ = train(output_dir, callbacks=[callback], stop_at=STOP_AT)
    assert interrupted == {s: reference[s] for s in range(1, STOP_AT + 1)}

    # Remote: checkpoint-4 rotated away after checkpoint-8 committed (save_total_limit=1).
    assert _names(storage) == [("checkpoint-8", True)]
    remote = storage.child("checkpoints/checkpoint-8")
    assert verify_checkpoint(remote) == []  # every file's size and CRC32C
    local = read_tree(output_dir / "checkpoint-8")
    manifest = read_manifest(remote)
    assert manifest is not None and manifest.checkpoint_id == 8
    assert sorted(r.path for r in manifest.files) == sorted(local)  # every Trainer file, byte for byte:
    assert {key: remote.read_bytes(key) for key in local} == local
    assert callback.last_committed == remote.url
    latest = find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options)
    assert latest is not None and latest.endswith("checkpoints/checkpoint-8")
    assert not (output_dir / STAGING_DIR).exists()

    shutil.rmtree(output_dir)  # the machine is gone
    fetched = fetch_latest_checkpoint(backend_url.url, output_dir, backend_url.storage_options)
    assert fetched == str(output_dir / "checkpoint-8")
    fetched_files = read_tree(fetched)
    assert fetched_files.pop(MANIFEST_NAME)
    assert fetched_files == local

    resumed, trainer = train(
        output_dir, callbacks=[CkptioCallback(backend_url.url, backend_url.storage_options)], resume=fetched
    )
    assert trainer.state.global_step == MAX_STEPS
    assert resumed == {s: reference[s] for s in range(2 * SAVE_STEPS + 1, MAX_STEPS + 1)}
    assert _names(storage) == [("checkpoint-12", True)]


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_upload_runs_in_a_background_thread(backend_url: Any, tmp_path: Path) -> None:
    """on_save returns while the upload is held; the Trainer deleting its local folder meanwhile does not
    matter; the next on_save joins it."""
    gated = GatedStorage(_open(backend_url))
    callback = CkptioCallback(gated, save_total_limit=2)
    started = time.monotonic()
    files = _save(callback, tmp_path, 4)
    assert time.monotonic() - started < 3.0  # the gate holds every write for 5 s
    assert callback.uploading
    assert _names(_open(backend_url)) in ([], [("checkpoint-4", False)])
    shutil.rmtree(tmp_path / "checkpoint-4")  # what the Trainer's own rotation does at the next save

    threading.Timer(0.3, gated.gate.set).start()
    _save(callback, tmp_path, 8)  # joins the upload of checkpoint-4 first
    assert _names(_open(backend_url))[0] == ("checkpoint-4", True)
    _end(callback, tmp_path)

    storage = _open(backend_url)
    assert _names(storage) == [("checkpoint-4", True), ("checkpoint-8", True)]
    assert {k: storage.read_bytes(f"checkpoints/checkpoint-4/{k}") for k in files} == files
    assert gated.threads and threading.main_thread().name not in gated.threads
    assert all(name.startswith("ckptio-upload") for name in gated.threads), gated.threads
    assert not (tmp_path / STAGING_DIR).exists()


def _ops_before_manifest(tmp_path: Path) -> int:
    """How many storage operations an upload makes before creating its manifest (a dry run)."""
    dry = FaultInjectingStorage(LocalStorage(str(tmp_path / "dry-store")))
    callback = CkptioCallback(dry)
    _save(callback, tmp_path / "dry-run", 8, limit=None)
    _end(callback, tmp_path / "dry-run")
    return dry.log.index(f"create {MANIFEST_NAME}")


@pytest.mark.parametrize(
    ("fail_at", "crash"), [("manifest", False), ("files", False), ("files", True)], ids=["manifest", "files", "crash"]
)
def test_interrupted_upload_is_never_fetched_and_is_cleaned_up(
    backend_url: Any, tmp_path: Path, fail_at: str, crash: bool
) -> None:
    out = tmp_path / "run"
    good = CkptioCallback(backend_url.url, backend_url.storage_options)
    first = _save(good, out, 4)
    _end(good, out)

    before_manifest = _ops_before_manifest(tmp_path)
    fail_after = before_manifest if fail_at == "manifest" else 4  # listing, marker, one file (open, commit)
    faulty_storage = FaultInjectingStorage(_open(backend_url), fail_after_ops=fail_after, crash=crash)
    faulty = CkptioCallback(faulty_storage)
    _save(faulty, out, 8)
    if crash:
        with pytest.raises(SimulatedCrash):
            _save(faulty, out, 12)  # joined at the next save
    else:
        with pytest.raises(StorageError, match="checkpoint-8") as raised:
            _end(faulty, out)
        assert isinstance(raised.value.__cause__, InjectedFault)
    assert faulty_storage.tripped

    storage = _open(backend_url)
    assert dict(_names(storage)) == {"checkpoint-4": True, "checkpoint-8": False}  # S3 times are in seconds
    leftover = set(storage.walk("checkpoints/checkpoint-8"))
    assert "checkpoint_in_progress.json" in leftover
    if fail_at == "manifest":  # every Trainer file made it: only the marker and the missing manifest tell
        assert "model.safetensors" in leftover and MANIFEST_NAME not in leftover
    fetched = fetch_latest_checkpoint(backend_url.url, tmp_path / "fetch", backend_url.storage_options)
    assert fetched == str(tmp_path / "fetch" / "checkpoint-4")
    assert {k: v for k, v in read_tree(fetched).items() if k != MANIFEST_NAME} == first

    later = CkptioCallback(backend_url.url, backend_url.storage_options)
    newest = _save(later, out, 16)
    _end(later, out)
    assert _names(storage) == [("checkpoint-16", True)]  # rotated, and the dead upload's folder removed
    fetched = fetch_latest_checkpoint(backend_url.url, tmp_path / "fetch", backend_url.storage_options)
    assert {k: v for k, v in read_tree(str(fetched)).items() if k != MANIFEST_NAME} == newest


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_fetch_reads_only_committed_checkpoints_and_checks_them(backend_url: Any, tmp_path: Path) -> None:
    storage = _open(backend_url)
    local = tmp_path / "fetch"
    assert fetch_latest_checkpoint(backend_url.url, local, backend_url.storage_options) is None

    callback = CkptioCallback(backend_url.url, backend_url.storage_options)
    files = _save(callback, tmp_path / "run", 4)
    _end(callback, tmp_path / "run")
    # A newer folder without a manifest: weights alone pass ckptio's rule for plain model folders.
    storage.write_bytes("checkpoints/checkpoint-20/model.safetensors", b"w" * 10)
    (local / "checkpoint-4").mkdir(parents=True)
    (local / "checkpoint-4" / "stale.bin").write_bytes(b"from an older fetch")
    listing = storage.list_objects("")

    fetched = fetch_latest_checkpoint(backend_url.url, local, backend_url.storage_options)
    assert fetched == str(local / "checkpoint-4")
    got = read_tree(fetched)
    assert got.pop(MANIFEST_NAME)
    assert got == files  # the stale copy was replaced whole
    assert storage.list_objects("") == listing  # fetching changed nothing there

    # A remote file with the right size but other bytes: refused, nothing under the checkpoint's name.
    storage.write_bytes("checkpoints/checkpoint-4/optimizer.pt", bytes(len(files["optimizer.pt"])))
    shutil.rmtree(fetched)
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt"):
        fetch_latest_checkpoint(backend_url.url, local, backend_url.storage_options)
    assert [p.name for p in local.iterdir()] == [".ckptio-tmp-fetch-checkpoint-4"]  # resumable, never listed
    assert "optimizer.pt" not in read_tree(local)
