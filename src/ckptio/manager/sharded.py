"""Sharded model and optimizer state (FSDP2, tensor parallel: DTensor), through DCP on every rank.

A model whose parameters are ``DTensor``s cannot be written as Hugging Face
shards by one rank: no rank holds it whole. The manager then takes the model's
state and that of every optimizer component together through
``torch.distributed.checkpoint.state_dict.get_state_dict`` (keys are parameter
names, values the ranks' own shards) and every rank writes its shards with
``dcp.save`` through :class:`ckptio.dcp.StorageWriter` into the checkpoint
folder, without a marker or manifest of its own: the files' records go into
the checkpoint's manifest, written last as for every checkpoint. On load,
``dcp.load`` reads, through :class:`ckptio.dcp.StorageReader`, only the byte
ranges each rank's shards need (so the checkpoint loads at another world size
or mesh), and ``set_state_dict`` puts them back. The other components keep
their sharing patterns.

The manifest marks such a checkpoint with ``metadata["sharded_state"]``:
the format and the keys of the optimizer components saved with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptio.dcp import StorageReader, StorageWriter
from ckptio.dcp.layout import FORMAT_NAME
from ckptio.errors import CkptioError
from ckptio.manager.failures import RankFailure, error_for
from ckptio.state import StateComponent, World
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord

__all__ = [
    "SHARDED_STATE_KEY",
    "ShardedState",
    "is_sharded_model",
    "load_sharded_state",
    "saved_sharded_keys",
    "split_optimizers",
    "take_sharded_state",
    "write_sharded_state",
]

#: Manifest metadata key of a checkpoint whose model and optimizers were saved sharded.
SHARDED_STATE_KEY = "sharded_state"


def is_sharded_model(model: nn.Module | None) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2, tensor parallel)."""
    if model is None:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def split_optimizers(components: Sequence[StateComponent]) -> tuple[list[StateComponent], list[StateComponent]]:
    """(optimizer components, the others): optimizers go sharded with a sharded model."""
    optimizers = [c for c in components if isinstance(c.stateful, torch.optim.Optimizer)]
    return optimizers, [c for c in components if c not in optimizers]


@dataclass(frozen=True)
class ShardedState:
    """A sharded model's state and that of its optimizers, as DCP saves and loads it."""

    state: dict[str, Any]
    optimizer_keys: tuple[str, ...]

    def manifest_metadata(self) -> dict[str, Any]:
        """What the manifest records about it."""
        return {"format": FORMAT_NAME, "optimizers": list(self.optimizer_keys)}


def take_sharded_state(model: nn.Module, optimizers: Sequence[StateComponent]) -> ShardedState:
    """The model's and the optimizers' state, keyed by parameter name, each rank's shards only."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, [c.stateful for c in optimizers])  # type: ignore[misc]
    state: dict[str, Any] = {"model": model_state}
    if optimizers:
        state["optimizer"] = optim_state
    return ShardedState(state, tuple(c.key for c in optimizers))


def _run_dcp(step: Callable[[], Any], *, action: str, safe: str) -> None:
    """Run a DCP save or load; its ``CheckpointException`` (a BaseException carrying every failed
    rank's error, raised on every rank) becomes the ckptio error of the lowest rank that failed with
    one (else a :class:`~ckptio.errors.CheckpointError` naming the error), the same on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        step()
    except CheckpointException as exc:
        errors = sorted((rank, error) for rank, (error, _) in exc.failures.items())
        ours = [(rank, error) for rank, error in errors if isinstance(error, CkptioError)]
        failures = [RankFailure.capture(rank, error) for rank, error in ours or errors]
        raise error_for(failures, action=action, safe=safe) from None


def _process_group(world: World) -> Any:
    return world.collective_group if world.is_distributed else None


def write_sharded_state(storage: Storage, sharded: ShardedState, world: World) -> list[FileRecord]:
    """Every rank writes its shards (a collective over ``world``'s group).

    Returns:
        On rank 0 (DCP's coordinator): every rank's files and DCP's metadata;
        on the other ranks: nothing.
    """
    from torch.distributed.checkpoint.state_dict_saver import save

    writer = StorageWriter(storage, commit=False)
    _run_dcp(
        lambda: save(
            sharded.state,
            storage_writer=writer,
            process_group=_process_group(world),
            no_dist=not world.is_distributed,
        ),
        action=f"cannot write the sharded state to {storage.url!r}",
        safe="nothing was committed",
    )
    return writer.records if world.rank == 0 else []


def saved_sharded_keys(metadata: dict[str, Any]) -> tuple[str, ...] | None:
    """The optimizer keys saved sharded, or None when the checkpoint holds no sharded state."""
    entry = metadata.get(SHARDED_STATE_KEY)
    if not isinstance(entry, dict):
        return None
    return tuple(str(k) for k in entry.get("optimizers", []))


def load_sharded_state(
    storage: Storage,
    files: Sequence[FileRecord],
    model: nn.Module,
    optimizers: Sequence[StateComponent],
    world: World,
) -> None:
    """Every rank reads the byte ranges of its shards and puts them into model and optimizers (a collective).

    Works at any world size or mesh, and into a model that is not sharded at
    all (full tensors). State the checkpoint lacks fails in ``dcp.load``.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    target = take_sharded_state(model, optimizers)
    reader = StorageReader(storage, known_files=files)
    _run_dcp(
        lambda: load(
            target.state, storage_reader=reader, process_group=_process_group(world), no_dist=not world.is_distributed
        ),
        action=f"cannot load the sharded state of {storage.url!r}",
        safe="the model and optimizer may hold part of it: load again before training",
    )
    set_state_dict(
        model,
        [c.stateful for c in optimizers],  # type: ignore[misc]
        model_state_dict=target.state["model"],
        optim_state_dict=target.state.get("optimizer", {}),
    )
