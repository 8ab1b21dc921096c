"""Resume a replicated model with one reader per node (``CheckpointConfig.load_broadcast``).

By default every rank reads the model weights from storage: N ranks send N
times the requests and download N copies. With ``load_broadcast`` the first
rank of each node (by ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``, else by host name;
see :mod:`ckptio.state.distributed`) reads them, and ``torch.distributed``
broadcasts every tensor to the other ranks of that node over a per-node
process group. That trades bucket requests and bytes for one extra copy of
the model over the node's interconnect, and for the broadcast's latency.

The protocol never leaves a rank waiting on a failed peer: the reader first
broadcasts whether its read succeeded (with its tensors' names, dtypes and
shapes), the node's ranks then agree that their models match that
description, and only then are tensors sent. Tensors travel as raw bytes, so
every dtype the process group can send as ``uint8`` works; they are sent
where they live, so the group's backend must support that device (gloo: CPU;
NCCL: CUDA).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckptio.errors import CheckpointError, StateDictMismatchError
from ckptio.format import read_model_weights
from ckptio.manager.failures import RankFailure
from ckptio.state import World
from ckptio.storage import Storage

__all__ = ["load_weights_per_node", "node_group"]

logger = logging.getLogger(__name__)

# (default process group, this rank's node group): node groups are created once per default group.
_NODE_GROUPS: list[tuple[Any, Any]] = []


def node_group(world: World) -> Any:
    """This rank's per-node process group (None: the default group spans the one node).

    Collective the first time per default process group when there are several
    nodes: every rank creates every node's group, in the same order.
    """
    if world.num_nodes == 1:
        return None
    default = dist.group.WORLD
    for owner, group in _NODE_GROUPS:
        if owner is default:
            return group
    blocks = sorted({tuple(ranks) for ranks in world.all_gather_object(world.node_ranks)})
    mine: Any = None
    for block in blocks:
        group = dist.new_group(list(block))
        if world.rank in block:
            mine = group
    _NODE_GROUPS[:] = [(default, mine)]
    return mine


def _unique_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's state tensors, each stored tensor once (tied weights are sent once)."""
    seen: set[tuple[Any, ...]] = set()
    unique: list[tuple[str, torch.Tensor]] = []
    for name, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.dtype,
               tuple(value.shape), value.stride())
        if key in seen:
            continue
        seen.add(key)
        unique.append((name, value))
    return unique


def _describe(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, str(t.dtype), tuple(t.shape)) for name, t in tensors]


def _difference(mine: list[tuple[str, str, tuple[int, ...]]], theirs: list[tuple[str, str, tuple[int, ...]]]) -> str:
    expected = {name: rest for name, *rest in theirs}
    have = {name: rest for name, *rest in mine}
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    changed = sorted(n for n in set(have) & set(expected) if have[n] != expected[n])
    parts = [f"{label} {names[:5]}" for label, names in
             (("lacks", missing), ("has extra", extra), ("differs in dtype/shape for", changed)) if names]
    return "; ".join(parts) or "its tensors are in another order"


def load_weights_per_node(storage: Storage, module: nn.Module, world: World) -> None:
    """Load ``module``'s weights on the first rank of each node and broadcast them to the node.

    Collective: every rank calls it, with its own replica of the same model. The
    non-reading ranks send no request to ``storage``. A world of one just reads.

    Raises:
        CheckpointError: the node's reader failed (the reader raises its own error;
            the others name it), or a rank's model does not match the reader's
            (:class:`~ckptio.errors.StateDictMismatchError`, on every rank of the node).
    """
    if world.world_size == 1:
        read_model_weights(storage, module, strict=True)
        return
    group = node_group(world)
    src = world.node_ranks[0]
    if len(world.node_ranks) == 1:  # alone on its node: nobody to share with
        read_model_weights(storage, module, strict=True)
        return
    error: BaseException | None = None
    failure: RankFailure | None = None
    if world.rank == src:
        try:
            read_model_weights(storage, module, strict=True)
        except Exception as exc:  # noqa: BLE001 - reported to the node, then raised below
            error, failure = exc, RankFailure.capture(world.rank, exc)
    tensors = _unique_tensors(module)
    mine = _describe(tensors)
    box: list[Any] = [(failure, mine) if world.rank == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    failure, expected = box[0]
    if failure is not None:
        if error is not None:
            raise error
        raise CheckpointError(
            f"cannot load the model weights of {storage.url!r}: rank {src}, which reads them for this node, "
            f"failed: {failure.type_name}: {failure.message}"
        )
    problem = None if mine == expected else _difference(mine, expected)
    problems: list[Any] = [None] * len(world.node_ranks)
    dist.all_gather_object(problems, problem, group=group)
    bad = [f"rank {r} {p}" for r, p in zip(world.node_ranks, problems, strict=True) if p is not None]
    if bad:
        raise StateDictMismatchError(
            f"cannot share the model weights of {storage.url!r} from rank {src}: the ranks' models differ "
            f"({'; '.join(bad)}); every rank of a data-parallel job must build the same model"
        )
    sent = 0
    for _, tensor in tensors:
        if tensor.numel() == 0:
            continue
        buffer = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.broadcast(buffer.reshape(-1).view(torch.uint8), src=src, group=group)
        if buffer is not tensor:
            tensor.copy_(buffer)
        sent += buffer.numel() * buffer.element_size()
    logger.debug("shared %d bytes of model weights from rank %d with ranks %s", sent, src, world.node_ranks)
