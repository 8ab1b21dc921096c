"""CkptioCheckpointIO: Lightning checkpoints saved, rotated, resumed and removed on local disk, S3 and GCS."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ckptio.checkpoint import (
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    read_manifest,
    verify_checkpoint,
)
from ckptio.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    SimulatedCrash,
)
from ckptio.integrations.lightning import (
    STATE_FILES,
    CkptioCheckpointIO,
    latest_checkpoint,
)
from ckptio.storage import FaultInjectingStorage, Storage, open_storage

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning"),
]

REMOTE_AND_LOCAL = pytest.mark.parametrize("backend_url", ["local", "s3", "gcs"], indirect=True)


# -- a tiny deterministic training run --------------------------------------------------------
class TinyModule(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}


class Recorder(Callback):
    """The weights after every step, and the step and weights training started from."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.start: tuple[int, dict[str, torch.Tensor]] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = (trainer.global_step, copy.deepcopy(pl_module.state_dict()))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator))
    return DataLoader(data, batch_size=4)  # two steps an epoch, always in the same order


def fit(
    url: str, io: CkptioCheckpointIO, *, seed: int, ckpt_path: str | None = None, max_epochs: int = 3
) -> tuple[pl.Trainer, Recorder]:
    recorder = Recorder()
    checkpoints = ModelCheckpoint(dirpath=url, monitor="step", mode="max", save_top_k=2, save_last=True)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        plugins=[io],
        callbacks=[checkpoints, recorder],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyModule(seed), loader(), ckpt_path=ckpt_path)
    return trainer, recorder


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.fixture
def lightning_fs(backend_url: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point fsspec's defaults at the test servers: ModelCheckpoint's own filesystem gets no options."""
    protocol = backend_url.url.split("://")[0] if "://" in backend_url.url else None
    if protocol is not None:
        monkeypatch.setitem(fsspec.config.conf, protocol, dict(backend_url.storage_options))
    yield


def plugin_at(backend_url: Any) -> tuple[str, dict[str, Any], CkptioCheckpointIO]:
    """The test's URL, its storage options, and a plugin using them."""
    return backend_url.url, backend_url.storage_options, CkptioCheckpointIO(backend_url.storage_options)


def folders(storage: Storage) -> dict[str, set[str]]:
    """Each ``*.ckpt`` folder below ``storage`` and the keys inside it."""
    found: dict[str, set[str]] = {}
    for key in storage.walk(""):
        name, _, rest = key.partition("/")
        found.setdefault(name, set()).add(rest)
    return found


# -- end to end ---------------------------------------------------------------------------------
@REMOTE_AND_LOCAL
def test_fit_saves_rotates_and_resumes_bit_for_bit(backend_url: Any, lightning_fs: None) -> None:
    url, options = backend_url.url, backend_url.storage_options
    storage = open_storage(url, **options)
    io = CkptioCheckpointIO(options)

    first, recorded = fit(url, io, seed=0)
    assert first.global_step == 6
    # save_top_k=2 removed epoch=0 on the storage; last.ckpt was rewritten at every epoch.
    saved = folders(storage)
    assert set(saved) == {"epoch=1-step=4.ckpt", "epoch=2-step=6.ckpt", "last.ckpt"}
    for name, keys in saved.items():
        assert MANIFEST_NAME in keys and IN_PROGRESS_NAME not in keys, name
        assert len(keys) == 2 and keys - {MANIFEST_NAME} <= set(STATE_FILES), keys
        manifest = read_manifest(storage.child(name))
        assert manifest is not None and [r.path for r in manifest.files] == sorted(keys - {MANIFEST_NAME})
        assert verify_checkpoint(storage.child(name)) == []  # sizes and CRC32C of every file
    assert saved["last.ckpt"] == {MANIFEST_NAME, STATE_FILES[0]}  # three saves: A, B, then A again
    assert latest_checkpoint(url, options) == f"{url}/last.ckpt"
    assert io.load_checkpoint(f"{url}/last.ckpt")["global_step"] == 6

    # Resume a fresh model (another seed) from the step-4 checkpoint, in the same run directory.
    second, resumed = fit(url, io, seed=1, ckpt_path=f"{url}/epoch=1-step=4.ckpt")
    assert resumed.start is not None
    start_step, start_weights = resumed.start
    assert start_step == 4
    assert_same(start_weights, recorded.weights[4])
    assert second.global_step == 6
    assert_same(second.lightning_module.state_dict(), recorded.weights[6])  # optimizer and scheduler too


def test_ckpt_path_last_on_local_disk(tmp_path: Any) -> None:
    url = str(tmp_path / "run")
    io = CkptioCheckpointIO()
    _, recorded = fit(url, io, seed=0, max_epochs=2)
    trainer, resumed = fit(url, io, seed=1, ckpt_path="last", max_epochs=3)
    assert resumed.start is not None and resumed.start[0] == 4
    assert_same(resumed.start[1], recorded.weights[4])
    assert trainer.global_step == 6


def test_interrupted_save_in_trainer_is_not_resumable(tmp_path: Any) -> None:
    url = str(tmp_path / "run")
    saves: list[int] = []

    def crash_second_save(storage: Storage) -> Storage:
        saves.append(1)
        return FaultInjectingStorage(storage, crash=True, fail_after_bytes=1000) if len(saves) == 2 else storage

    with pytest.raises(SimulatedCrash):
        fit(url, CkptioCheckpointIO(storage_wrapper=crash_second_save), seed=0)
    crashed = f"{url}/last.ckpt"  # the first save was epoch=0-step=2.ckpt, the second last.ckpt
    assert folders(open_storage(url))["last.ckpt"] == {IN_PROGRESS_NAME}
    with pytest.raises(IncompleteCheckpointError, match="last.ckpt"):
        fit(url, CkptioCheckpointIO(), seed=0, ckpt_path=crashed)
    # Resuming from the checkpoint before the crash works; the crashed folder is never taken for one.
    trainer, _ = fit(url, CkptioCheckpointIO(), seed=0, ckpt_path=f"{url}/epoch=0-step=2.ckpt")
    assert trainer.global_step == 6
    latest = latest_checkpoint(url)
    assert latest is not None and latest != crashed
    assert CkptioCheckpointIO().load_checkpoint(latest)["global_step"] == 6


# -- crash safety of the plugin on its own --------------------------------------------------------
def state(value: float) -> dict[str, Any]:
    return {
        "global_step": int(value),
        "epoch": 0,
        "state_dict": {"w": torch.full((64, 64), value), "b": torch.arange(64.0) + value},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(value)}}, "param_groups": [{"lr": 0.1}]}],
        "hyper_parameters": {"name": f"run-{value}"},
    }


def assert_state(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["global_step"] == expected["global_step"]
    assert_same(got["state_dict"], expected["state_dict"])
    assert got["hyper_parameters"] == expected["hyper_parameters"]


def count_ops(options: dict[str, Any], act: Callable[[CkptioCheckpointIO], None]) -> int:
    """How many storage operations ``act`` takes through a plugin (one storage per plugin call)."""
    counters: list[FaultInjectingStorage] = []

    def count(storage: Storage) -> Storage:
        counters.append(FaultInjectingStorage(storage))
        return counters[-1]

    act(CkptioCheckpointIO(options, storage_wrapper=count))
    return counters[0].operations


def load_outcome(io: CkptioCheckpointIO, path: str, expected: dict[str, Any]) -> str:
    """``"loaded"`` when ``path`` loads exactly ``expected``, else the ckptio error's class name."""
    try:
        loaded = io.load_checkpoint(path)
    except CheckpointError as exc:
        assert path in str(exc)
        return type(exc).__name__
    assert_state(loaded, expected)
    return "loaded"


def crashing(options: dict[str, Any], **faults: Any) -> CkptioCheckpointIO:
    return CkptioCheckpointIO(options, storage_wrapper=lambda s: FaultInjectingStorage(s, crash=True, **faults))


@REMOTE_AND_LOCAL
def test_interrupted_save_is_never_loadable(backend_url: Any) -> None:
    url, options, io = plugin_at(backend_url)
    total = count_ops(options, lambda io: io.save_checkpoint(state(1), f"{url}/probe.ckpt"))
    # A crash after each operation of a fresh save: nothing loads until the manifest is there.
    outcomes = []
    for ops in range(total):
        path = f"{url}/fresh-{ops}.ckpt"
        with pytest.raises(SimulatedCrash):
            crashing(options, fail_after_ops=ops).save_checkpoint(state(1), path)
        outcomes.append(load_outcome(io, path, state(1)))
    assert outcomes[-1] == "loaded"  # the crash hit the clean-up after the commit: complete
    assert "loaded" not in outcomes[:-1] and "IncompleteCheckpointError" in outcomes, outcomes
    # Crashed mid-stream: the half-written state file never becomes visible.
    path = f"{url}/midway.ckpt"
    with pytest.raises(SimulatedCrash):
        crashing(options, fail_after_bytes=8000).save_checkpoint(state(1), path)
    assert folders(open_storage(url, **options))["midway.ckpt"] == {IN_PROGRESS_NAME}  # marker first, no part
    with pytest.raises(IncompleteCheckpointError, match="midway.ckpt"):
        io.load_checkpoint(path)
    assert latest_checkpoint(url, options) == f"{url}/fresh-{total - 1}.ckpt"
    io.save_checkpoint(state(2), path)  # the leftovers are replaced
    assert_state(io.load_checkpoint(path), state(2))
    assert set(folders(open_storage(url, **options))["midway.ckpt"]) == {MANIFEST_NAME, STATE_FILES[0]}


@REMOTE_AND_LOCAL
def test_interrupted_overwrite_keeps_the_previous_checkpoint(backend_url: Any) -> None:
    url, options, io = plugin_at(backend_url)
    path = f"{url}/last.ckpt"
    io.save_checkpoint(state(1), path)
    # An overwrite: state 2 goes to the other file.
    total = count_ops(options, lambda io: io.save_checkpoint(state(2), path))
    assert_state(io.load_checkpoint(path), state(2))
    seen = set()
    for ops in range(total):
        with pytest.raises(SimulatedCrash):
            crashing(options, fail_after_ops=ops).save_checkpoint(state(3), path)
        loaded = io.load_checkpoint(path)  # always one complete checkpoint: never an error, never a mix
        expected = state(3) if loaded["global_step"] == 3 else state(2)
        assert_state(loaded, expected)
        seen.add(loaded["global_step"])
        io.save_checkpoint(state(2), path)  # back to state 2 for the next crash point
    assert seen == {2, 3}


@REMOTE_AND_LOCAL
def test_interrupted_removal_never_leaves_a_loadable_half(backend_url: Any) -> None:
    url, options, io = plugin_at(backend_url)
    path = f"{url}/epoch=0-step=2.ckpt"
    io.save_checkpoint(state(1), path)
    total = count_ops(options, lambda io: io.remove_checkpoint(path))
    outcomes = []
    for ops in range(total):
        io.save_checkpoint(state(1), path)
        with pytest.raises(SimulatedCrash):
            crashing(options, fail_after_ops=ops).remove_checkpoint(path)
        left = folders(open_storage(url, **options)).get("epoch=0-step=2.ckpt", set())
        assert MANIFEST_NAME not in left or STATE_FILES[0] in left or STATE_FILES[1] in left, left  # manifest first
        outcomes.append(load_outcome(io, path, state(1)))  # "loaded": nothing deleted yet, intact
    # Once anything is deleted (the manifest goes first), it never loads again.
    first_gone = outcomes.index("IncompleteCheckpointError")
    assert set(outcomes[:first_gone]) == {"loaded"} and "loaded" not in outcomes[first_gone:], outcomes
    io.remove_checkpoint(path)  # finishes an interrupted removal
    assert open_storage(url, **options).walk("") == []
    with pytest.raises(CheckpointNotFoundError, match="step=2.ckpt"):
        io.load_checkpoint(path)
    io.remove_checkpoint(path)  # nothing there: nothing to do


# -- verification on load --------------------------------------------------------------------------
@REMOTE_AND_LOCAL
def test_load_verifies_sizes_and_checksums_and_writes_nothing(backend_url: Any) -> None:
    url, options, io = plugin_at(backend_url)
    path = f"{url}/x.ckpt"
    io.save_checkpoint(state(1), path)
    folder = open_storage(path, **options)
    before = [(o.key, o.size, o.mtime) for o in folder.list_objects("")]
    assert_state(io.load_checkpoint(path), state(1))
    assert [(o.key, o.size, o.mtime) for o in folder.list_objects("")] == before

    good = folder.read_bytes(STATE_FILES[0])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    folder.write_bytes(STATE_FILES[0], bytes(flipped))  # same size, other bytes
    with pytest.raises(CorruptCheckpointError, match=r"x\.ckpt/lightning_state\.pt.*CRC32C"):
        io.load_checkpoint(path)
    folder.write_bytes(STATE_FILES[0], good[:-10])
    with pytest.raises(CorruptCheckpointError, match="wrong size"):
        io.load_checkpoint(path)
    folder.delete(STATE_FILES[0])
    with pytest.raises(IncompleteCheckpointError, match="missing"):
        io.load_checkpoint(path)
    io.save_checkpoint(state(2), path)  # a damaged checkpoint is replaced by the next save there
    assert_state(io.load_checkpoint(path), state(2))
    folder.write_bytes(MANIFEST_NAME, b"{not json")
    with pytest.raises(CorruptCheckpointError, match=r"x\.ckpt/checkpoint_manifest\.json"):
        io.load_checkpoint(path)
    io.save_checkpoint(state(3), path)
    assert_state(io.load_checkpoint(path), state(3))
    with pytest.raises(CheckpointNotFoundError, match="nothing.ckpt"):
        io.load_checkpoint(f"{url}/nothing.ckpt")


def test_unsafe_values_are_refused_before_anything_is_written(tmp_path: Any) -> None:
    import argparse

    io = CkptioCheckpointIO()
    checkpoint = {**state(1), "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}}
    with pytest.raises(InvalidArgumentError, match="hyper_parameters.args"):
        io.save_checkpoint(checkpoint, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_single_file_checkpoints_are_not_taken_for_ours(tmp_path: Any) -> None:
    plain = tmp_path / "plain.ckpt"
    torch.save(state(1), plain)
    io = CkptioCheckpointIO()
    with pytest.raises(CheckpointNotFoundError, match="single file"):
        io.load_checkpoint(plain)
    with pytest.raises(CheckpointExistsError, match="single file"):
        io.save_checkpoint(state(2), plain)
    assert torch.load(plain, weights_only=True)["global_step"] == 1
    io.remove_checkpoint(plain)  # Lightning asked to remove it: it goes, like with TorchCheckpointIO
    assert not plain.exists()
