"""CheckpointManager behaviour on every backend: round trip, commit, rotation, best, errors."""

from __future__ import annotations

import json

import pytest
import torch
from manager_helpers import TinyTrainer, manager_for, same_state, state_of

from ckptio import (
    CheckpointConfig,
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    MissingComponentWarning,
    SharingPattern,
    StateComponent,
    TrainingProgress,
    find_latest_checkpoint,
    load_checkpoint_metrics,
)
from ckptio.checkpoint import IN_PROGRESS_NAME, MANIFEST_NAME, read_manifest
from ckptio.storage import open_storage


def storage_of(backend_url):
    return open_storage(backend_url.url, **backend_url.storage_options)


def stored_checkpoints(backend_url) -> list[str]:
    """Checkpoint folders that still hold objects (S3 may list emptied prefixes for a while)."""
    storage = storage_of(backend_url)
    return [n for n in storage.list("checkpoints") if storage.walk(f"checkpoints/{n}")]


def test_round_trip_restores_every_component(backend_url) -> None:
    trainer = TinyTrainer()
    for _ in range(3):
        trainer.step()
    path = manager_for(trainer, backend_url).save_checkpoint()
    assert path.endswith("checkpoints/checkpoint-1")
    saved = state_of(trainer)

    fresh = TinyTrainer(seed=1)
    fresh.step()
    assert not same_state(state_of(fresh), saved)
    manager_for(fresh, backend_url).load_checkpoint(None)
    assert same_state(state_of(fresh), saved)
    assert fresh.progress.step == 3


def test_layout_and_manifest_list_every_file(backend_url) -> None:
    trainer = TinyTrainer()
    trainer.step()
    manager_for(trainer, backend_url).save_checkpoint(metrics={"loss": 0.5})
    ckpt = storage_of(backend_url).child("checkpoints/checkpoint-1")
    files = set(ckpt.walk())
    assert {
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
        "optimizer_state.pt",
        "scheduler_state.pt",
        "progress_state.pt",
        "rng_state_rank_0.pt",
        "eval_metrics.json",
        MANIFEST_NAME,
    } == files
    manifest = read_manifest(ckpt)
    assert manifest is not None
    listed = {f.path: f.size for f in manifest.files}
    assert set(listed) == files - {MANIFEST_NAME}
    assert all(ckpt.size(name) == size for name, size in listed.items())
    assert manifest.checkpoint_path == "checkpoints/checkpoint-1"
    assert manifest.world_size == 1
    components = manifest.components
    assert components["rng"].sharing_pattern == "per_rank" and components["rng"].ranks == [0]
    assert components["optimizer"].replicated_across == [0]
    assert json.loads(ckpt.read_bytes("eval_metrics.json")) == {"loss": 0.5}


def test_checkpoint_numbers_increase(backend_url) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url)
    paths = [manager.save_checkpoint() for _ in range(3)]
    assert [p.rsplit("-", 1)[-1] for p in paths] == ["1", "2", "3"]
    assert find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options) == paths[-1]


def test_a_complete_checkpoint_is_never_overwritten(backend_url) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url)
    manager.save_checkpoint(checkpoint_id=5)
    before = storage_of(backend_url).child("checkpoints/checkpoint-5").read_bytes(MANIFEST_NAME)
    trainer.step()
    with pytest.raises(CheckpointExistsError, match="checkpoint-5"):
        manager.save_checkpoint(checkpoint_id=5)
    assert storage_of(backend_url).child("checkpoints/checkpoint-5").read_bytes(MANIFEST_NAME) == before


def test_incomplete_leftover_with_the_same_name_is_replaced(backend_url) -> None:
    leftover = storage_of(backend_url).child("checkpoints/checkpoint-2")
    leftover.write_bytes(IN_PROGRESS_NAME, b"{}")
    leftover.write_bytes("optimizer_state.pt", b"half a file")
    trainer = TinyTrainer()
    path = manager_for(trainer, backend_url).save_checkpoint(checkpoint_id=2)
    assert find_latest_checkpoint(backend_url.url, storage_options=backend_url.storage_options) == path
    fresh = TinyTrainer(seed=3)
    manager_for(fresh, backend_url).load_checkpoint(None)
    assert same_state(state_of(fresh), state_of(trainer))


def test_rotation_keeps_newest_and_best(backend_url) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url, save_total_limit=2, preserve_n_best=1)
    first = manager.save_checkpoint()
    assert manager.update_best_checkpoints(first, {"loss": 0.0})  # a metric of 0 is a metric
    for loss in (0.5, 0.7, 0.9):
        path = manager.save_checkpoint()
        assert not manager.update_best_checkpoints(path, {"loss": loss})
    # The best counts toward save_total_limit=2, as in the Hugging Face Trainer: the best and the newest.
    assert stored_checkpoints(backend_url) == ["checkpoint-1", "checkpoint-4"]
    assert load_checkpoint_metrics(first, storage_options=backend_url.storage_options) == {"loss": 0.0}


def test_best_list_survives_resume(backend_url) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url, save_total_limit=1, preserve_n_best=1)
    first = manager.save_checkpoint()
    manager.update_best_checkpoints(first, {"accuracy": 0.9}, metric_key="accuracy")
    manager.save_checkpoint()

    resumed = manager_for(TinyTrainer(), backend_url, save_total_limit=1, preserve_n_best=1)
    resumed.load_checkpoint(None)
    assert [e.name for e in resumed.best_checkpoints] == ["checkpoint-1"]
    resumed.save_checkpoint()
    assert stored_checkpoints(backend_url) == ["checkpoint-1", "checkpoint-3"]


def test_set_best_checkpoint_is_preserved(backend_url) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url, save_total_limit=1)
    manager.set_best_checkpoint(manager.save_checkpoint())
    manager.save_checkpoint()
    manager.save_checkpoint()
    assert stored_checkpoints(backend_url) == ["checkpoint-1", "checkpoint-3"]


def test_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="save_total_limit"):
        CheckpointConfig(output_dir="unused", save_total_limit=0)


def test_load_without_any_checkpoint(backend_url) -> None:
    manager = manager_for(TinyTrainer(), backend_url)
    assert manager.resolve_checkpoint_path(None) is None
    with pytest.raises(CheckpointNotFoundError):
        manager.load_checkpoint(None)


def test_an_incomplete_checkpoint_is_not_loaded(backend_url) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url)
    manager.save_checkpoint()
    ckpt = storage_of(backend_url).child("checkpoints/checkpoint-2")
    ckpt.write_bytes(IN_PROGRESS_NAME, b"{}")
    with pytest.raises(IncompleteCheckpointError):
        manager.load_checkpoint("checkpoint-2")
    assert manager.resolve_checkpoint_path(None).endswith("checkpoint-1")


def test_missing_required_component_is_an_error_optional_a_warning(backend_url) -> None:
    manager_for(TinyTrainer(), backend_url).save_checkpoint()
    required = TinyTrainer(extra=[StateComponent("ema", TrainingProgress(), SharingPattern.GLOBAL)])
    with pytest.raises(IncompleteCheckpointError, match="'ema'"):
        manager_for(required, backend_url).load_checkpoint(None)
    optional = TinyTrainer(extra=[StateComponent("ema", TrainingProgress(step=9), SharingPattern.GLOBAL, required=False)])
    with pytest.warns(MissingComponentWarning, match="ema"):
        manager_for(optional, backend_url).load_checkpoint(None)
    assert optional.extra[0].stateful.step == 9


def test_verify_on_load_catches_a_flipped_byte(backend_url) -> None:
    trainer = TinyTrainer()
    manager_for(trainer, backend_url).save_checkpoint()
    ckpt = storage_of(backend_url).child("checkpoints/checkpoint-1")
    data = bytearray(ckpt.read_bytes("scheduler_state.pt"))
    data[-10] ^= 0xFF
    ckpt.write_bytes("scheduler_state.pt", bytes(data))
    manager = manager_for(TinyTrainer(), backend_url, verify_checksums_on_load=True)
    with pytest.raises(ValueError, match="scheduler_state.pt"):
        manager.load_checkpoint(None)


def test_save_model_writes_a_loadable_model_directory(backend_url) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url)
    target = f"{backend_url.url}/final"
    manager.save_model(target)
    with pytest.raises(CheckpointExistsError):
        manager.save_model(target)
    manager.save_model(target, overwrite_output_dir=True)
    fresh = TinyTrainer(seed=5)
    import ckptio

    ckptio.load_checkpoint(target, fresh.model, storage_options=backend_url.storage_options)
    for a, b in zip(fresh.model.state_dict().values(), trainer.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_folder_of_foreign_files_is_never_cleared(backend_url) -> None:
    foreign = storage_of(backend_url).child("checkpoints/checkpoint-3")
    foreign.write_bytes("notes.txt", b"precious")
    with pytest.raises(CheckpointExistsError, match="not a ckptio checkpoint"):
        manager_for(TinyTrainer(), backend_url).save_checkpoint(checkpoint_id=3)
    assert foreign.read_bytes("notes.txt") == b"precious"


def test_a_bare_checkpoint_name_always_means_one_under_the_output_dir(
    backend_url, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "checkpoint-1").mkdir()  # a folder of that name in the working directory must never be used
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url, preserve_n_best=1)
    path = manager.save_checkpoint()
    assert manager.resolve_checkpoint_path("checkpoint-1") == path
    assert manager.update_best_checkpoints("checkpoint-1", {"loss": 0.25})
    manager.set_best_checkpoint("checkpoint-1")
    assert load_checkpoint_metrics(path, storage_options=backend_url.storage_options) == {"loss": 0.25}
    manager_for(TinyTrainer(seed=2), backend_url).load_checkpoint("checkpoint-1")
    assert list(cwd.iterdir()) == [cwd / "checkpoint-1"] and not any((cwd / "checkpoint-1").iterdir())
    with caplog.at_level("WARNING", logger="ckptio.manager.checkpoint_manager"):
        assert manager.resolve_checkpoint_path("checkpoint-9") is None
    assert "checkpoint-9" in caplog.text


def test_an_explicit_path_that_is_not_a_valid_checkpoint_resolves_to_none(backend_url) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url)
    manager.save_checkpoint()
    leftover = storage_of(backend_url).child("checkpoints/checkpoint-2")
    leftover.write_bytes(IN_PROGRESS_NAME, b"{}")
    assert manager.resolve_checkpoint_path(leftover.url) is None
    assert manager.resolve_checkpoint_path(None) == storage_of(backend_url).url_of("checkpoints/checkpoint-1")
