"""One rank's half of a resume: put a checkpoint's state back into model and components.

Rank 0 has found the checkpoint and shared its manifest; every rank then runs
:func:`restore_state`. The order matters across ranks, because some steps are
collectives of the training loop's process group and must run on the calling
thread, in the same order everywhere: sharded state first (``dcp.load``), then
the per-node weight broadcast when asked for; the plain weight download and the
components can then overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ckptio.checkpoint import CheckpointManifest
from ckptio.errors import InvalidArgumentError
from ckptio.format import read_model_weights
from ckptio.manager.broadcast import load_weights_per_node
from ckptio.manager.components import load_components
from ckptio.manager.sharded import (
    is_sharded_model,
    load_sharded_state,
    saved_sharded_keys,
)
from ckptio.state import StateComponent, World
from ckptio.storage import KnownObjectsStorage, ObjectInfo, Storage
from ckptio.storage.transfer import run_both

__all__ = ["restore_state"]


def restore_state(
    storage: Storage,
    manifest: CheckpointManifest | None,
    model: nn.Module | None,
    components: Sequence[StateComponent],
    world: World,
    *,
    load_broadcast: bool = False,
    on_world_size_change: str = "error",
) -> None:
    """Restore this rank's model and components from the checkpoint in ``storage``.

    ``manifest`` None means a bare model directory (weights only). Called by
    every rank; collectives run on this thread.

    Raises:
        InvalidArgumentError: sharded state without a model, or full weights
            into a sharded (DTensor) model.
    """
    if manifest is not None:  # committed: every rank knows its files from rank 0's manifest
        storage = KnownObjectsStorage(storage, [ObjectInfo(r.path, r.size, None) for r in manifest.files])
    components = list(components)
    sharded_keys = saved_sharded_keys(manifest.metadata) if manifest is not None else None
    if manifest is not None and sharded_keys is not None:
        if model is None:
            raise InvalidArgumentError(f"cannot load {storage.url!r}: it holds sharded model state; pass the model")
        optimizers = [c for c in components if c.key in sharded_keys]
        components = [c for c in components if c.key not in sharded_keys]
        load_sharded_state(storage, manifest.files, model, optimizers, world)  # a collective: here, first
        model = None
    elif model is not None and is_sharded_model(model):
        raise InvalidArgumentError(
            f"cannot load {storage.url!r} into a sharded (DTensor) model: it holds full Hugging Face weights, "
            "not sharded state; load it into the unsharded model before sharding it"
        )
    if model is not None and load_broadcast:
        load_weights_per_node(storage, model, world)  # collectives: on this thread, alone
        model = None
    weights_target = model

    def read_weights() -> None:
        if weights_target is not None:
            read_model_weights(storage, weights_target, strict=True)

    def read_components() -> None:
        if manifest is not None:
            load_components(storage, components, world, manifest, on_world_size_change=on_world_size_change)

    # On object stores the weights download on a thread of their own (plain tensor copies) while the
    # components, whose load_state_dict may touch thread-bound state such as the current CUDA device,
    # load on this thread.
    run_both(read_weights, read_components, concurrently=storage.is_remote)
