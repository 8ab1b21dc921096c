"""What each gloo rank runs in the sharded (FSDP2) resume tests (not collected by pytest).

A trainer with a ``fully_shard``-ed model, its AdamW optimizer (saved sharded, through
DCP), a scheduler and progress (GLOBAL) and every RNG of the rank (PER_RANK). Each
step's data come from a generator seeded by (step, rank); dropout on the input draws
from the rank's global torch RNG, seeded differently on every rank, so an exact
resume needs the RNG state of each rank back as well as model and optimizer.

Workers run several scenarios per spawn; a scenario that raises is reported as its
traceback, so the other scenarios of the spawn still run and report.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from sharded_workers import _packed as packed
from sharded_workers import fsdp_model, gathered
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from ckptio import (
    CheckpointConfig,
    CheckpointManager,
    CkptioError,
    RNGState,
    SharingPattern,
    StateComponent,
    TrainingProgress,
    find_latest_checkpoint,
)

#: Steps of the uninterrupted reference run, and the step after which the interrupted run saves.
TOTAL_STEPS = 6
SAVE_AFTER = 3


class ResumeTrainer:
    """An FSDP2 model (left whole, or on a mesh of one, in a world of one) and its training state."""

    def __init__(self, world_size: int, rank: int, seed: int = 1, *, mesh_of_one: bool = False) -> None:
        self.model, self.optimizer = fsdp_model(world_size, seed)
        if mesh_of_one:
            if world_size != 1:
                raise ValueError("mesh_of_one is for a world of one")
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.model, mesh=init_device_mesh("cpu", (1,)))
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)  # over the DTensor parameters
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.progress = TrainingProgress()
        self.rng = RNGState()
        torch.manual_seed(seed * 1000 + 17 * rank)  # every rank's dropout draws differ

    def get_state_components(self) -> list[StateComponent]:
        return [
            StateComponent("optimizer", self.optimizer, SharingPattern.GLOBAL),
            StateComponent("scheduler", self.scheduler, SharingPattern.GLOBAL),
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
        ]

    def get_process_groups(self) -> dict[str, Any]:
        return {}

    def step(self, rank: int) -> str:
        """One training step; its loss on this rank, as ``float.hex``."""
        step = self.progress.step + 1
        data = torch.Generator().manual_seed(100_003 * step + rank)
        inputs = nn.functional.dropout(torch.randn(4, 16, generator=data), p=0.25, training=True)
        loss = self.model(inputs).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.progress.step = step
        return float(loss.item()).hex()

    def state(self) -> dict[str, Any]:
        """Full (gathered) model and optimizer state, with scheduler, progress and RNG (a collective)."""
        return {
            **gathered(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "progress": self.progress.state_dict(),
            "rng": self.rng.state_dict(),
        }

    def manager(self, url: str, storage_options: dict[str, Any] | None = None, **config: Any) -> CheckpointManager:
        cfg = CheckpointConfig(output_dir=url, storage_options=storage_options, **config)
        return CheckpointManager(cfg, self, model=self.model)


def digest(state: Any) -> str:
    """SHA-256 of nested state: tensors by dtype, shape and bytes, the rest by repr."""
    sha = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                sha.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                feed(item)
        elif isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            sha.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
            sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            sha.update(repr(value).encode())

    feed(state)
    return sha.hexdigest()


def train_and_save(rank: int, world_size: int, targets: list[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    """The reference run (TOTAL_STEPS uninterrupted), then a run of SAVE_AFTER steps saved to every target."""
    warnings.simplefilter("ignore")
    reference = ResumeTrainer(world_size, rank)
    reference_losses = [reference.step(rank) for _ in range(TOTAL_STEPS)]
    reference_final = digest(reference.state())
    del reference
    trainer = ResumeTrainer(world_size, rank)
    losses = [trainer.step(rank) for _ in range(SAVE_AFTER)]
    paths = [trainer.manager(url, options).save_checkpoint() for url, options in targets]
    return {
        "reference_losses": reference_losses,
        "reference_final": reference_final,
        "losses_before_save": losses,
        "paths": paths,
        "saved": packed(trainer.state()),
    }


def _exact(rank: int, world_size: int, url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """A new process resumes (built exactly as the first run was) and trains to TOTAL_STEPS."""
    trainer = ResumeTrainer(world_size, rank)
    before = packed(trainer.state())  # now: a gathered tensor may share the parameter's memory
    trainer.manager(url, options).load_checkpoint(None)
    loaded = packed(trainer.state())
    losses = [trainer.step(rank) for _ in range(TOTAL_STEPS - trainer.progress.step)]
    return {
        "before": before,
        "loaded": loaded,
        "losses": losses,
        "final": digest(trainer.state()),
    }


def _reshard(rank: int, world_size: int, url: str, mesh_of_one: bool) -> dict[str, Any]:
    """Another model (other values, one step of its own) loads a checkpoint saved at another world size."""
    trainer = ResumeTrainer(world_size, rank, seed=2, mesh_of_one=mesh_of_one)
    trainer.step(rank)
    # Packed now: on a mesh of one, full_tensor() of a parameter is that parameter's own memory.
    before = packed(trainer.state())
    # RNG was saved per rank at another world size: leave it as initialised ("skip").
    trainer.manager(url, on_world_size_change="skip").load_checkpoint(None)
    return {"before": before, "loaded": packed(trainer.state())}


def _refused(rank: int, world_size: int, url: str, checkpoint: str) -> dict[str, Any]:
    """Loads of a checkpoint with a damaged file: every call's error, and the state after each."""
    trainer = ResumeTrainer(world_size, rank, seed=2)
    trainer.step(rank)
    result: dict[str, Any] = {"before": packed(trainer.state()), "attempts": {}}
    for name, target in (("explicit", checkpoint), ("latest", None)):
        outcome: dict[str, Any] = {"raised": None, "message": ""}
        try:
            trainer.manager(url).load_checkpoint(target)
        except CkptioError as exc:
            outcome = {"raised": type(exc).__name__, "message": str(exc)}
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - not a ckptio error: the test fails on it
            outcome = {"raised": f"not a CkptioError: {type(exc).__name__}", "message": traceback.format_exc()}
        outcome["after"] = packed(trainer.state())
        result["attempts"][name] = outcome
    return result


def _scenario(rank: int, world_size: int, scenario: dict[str, Any]) -> dict[str, Any]:
    kind = scenario["kind"]
    if kind == "exact":
        return _exact(rank, world_size, scenario["url"], scenario.get("options"))
    if kind == "reshard":
        return _reshard(rank, world_size, scenario["url"], bool(scenario.get("mesh_of_one", False)))
    if kind == "refused":
        return _refused(rank, world_size, scenario["url"], scenario["checkpoint"])
    raise ValueError(f"unknown scenario {kind!r}")


def resume_scenarios(rank: int, world_size: int, scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each scenario (``kind``: exact, reshard, refused) in turn; one result each."""
    warnings.simplefilter("ignore")
    results = []
    for scenario in scenarios:
        try:
            results.append(_scenario(rank, world_size, scenario))
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results.append({"error": traceback.format_exc()})
    return results


def _save_outcome(manager: CheckpointManager) -> dict[str, Any]:
    """Save (and wait for it): what it raised, how long it took, and the latest checkpoint afterwards."""
    started = time.monotonic()
    outcome: dict[str, Any] = {"raised": None, "message": ""}
    try:
        manager.save_checkpoint()
        manager.wait_until_finished()
    except CkptioError as exc:
        outcome = {"raised": type(exc).__name__, "message": str(exc)}
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - not a ckptio error: the test fails on it
        outcome = {"raised": f"not a CkptioError: {type(exc).__name__}", "message": traceback.format_exc()}
    outcome["waited_s"] = time.monotonic() - started
    outcome["latest"] = find_latest_checkpoint(manager.config.output_dir)
    return outcome


def rank_fails_mid_sharded_save(rank: int, world_size: int, output: str, report_dir: str, async_save: bool) -> None:
    """Save once together (checkpoint-1); then rank 1 fails while writing its shards (DCP data file):

    * checkpoint-2: its write raises a StorageError; every rank reports (``rank<r>-error.json``);
    * checkpoint-3: it dies (``os._exit``) with part of its file written; the other ranks
      report (``rank<r>-death.json``).
    """
    from ckptio.dcp.writer import StorageWriter
    from ckptio.errors import StorageError

    warnings.simplefilter("ignore")
    trainer = ResumeTrainer(world_size, rank)
    trainer.step(rank)
    manager = trainer.manager(output, async_save=async_save, async_timeout_s=20)
    manager.save_checkpoint()
    manager.wait_until_finished()
    trainer.step(rank)
    write_file = StorageWriter._write_file

    def fail(self: StorageWriter, name: str, *args: object) -> None:
        raise StorageError(f"cannot write {self._storage.url_of(name)!r}: injected failure")

    def die(self: StorageWriter, name: str, *args: object) -> None:
        self._storage.open_writer(name).write(b"\0" * 4096)  # part of its data file is on its way
        os._exit(3)  # killed while writing it: no clean-up, no report

    if rank == 1:
        StorageWriter._write_file = fail  # type: ignore[method-assign]
    outcome = _save_outcome(manager)
    StorageWriter._write_file = write_file  # type: ignore[method-assign]
    Path(report_dir, f"rank{rank}-error.json").write_text(json.dumps(outcome))
    if rank == 1:
        StorageWriter._write_file = die  # type: ignore[method-assign]
    outcome = _save_outcome(manager)
    Path(report_dir, f"rank{rank}-death.json").write_text(json.dumps(outcome))
