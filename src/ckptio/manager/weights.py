"""Model weights of a data-parallel save: which rank writes which shard. Planning does no I/O.

The manager's model is replicated: every rank holds the same full model (DDP,
or a single process). A world of one writes the weights as it always has
(:func:`~ckptio.format.writer.write_model_weights`). A world of N > 1 splits
the upload instead: global rank 0 plans one shard index for the whole model
and shares it with the save plan, every rank writes a distinct subset of the
shards from its own replica (so N ranks upload over N ranks' connections),
and after the ranks have gathered what they wrote, rank 0 publishes the index
and then the manifest. The files are standard Hugging Face shards and one
standard index; a crash while any rank writes leaves neither index nor
manifest, so the checkpoint is never taken for a complete one.

Shard size. A model that fits one shard would give one rank all the work, so
with N ranks the shard size is ``min(max_shard_size, max(ceil(total / N),
MIN_SPLIT_SHARD_SIZE))``: at least N shards when the model is large enough
(tensors are never split, so one huge tensor still makes one huge shard), but
never shards below 64 MiB just to keep every rank busy. Below that size a
request's round trip costs more than its bytes, and every extra shard is one
more request on every later load. The number of shards, and so the file
names, therefore depends on the world size; the index names them, so any
world size (and any Hugging Face loader) reads the checkpoint.

Assignment. Shards go to ranks greedily, largest first, each to the rank with
the fewest bytes so far (ties to the lower rank), which keeps the busiest rank
within one shard of the average.

The ranks' replicas are assumed equal, as for the rest of the manager's
model handling; each rank writes its shards from its own copy. A rank whose
model has other tensors than rank 0's (names) fails the save before it writes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptio.errors import InvalidArgumentError
from ckptio.format import create_sharing_metadata, make_shard_index
from ckptio.format.constants import index_name_for
from ckptio.format.planner import tensor_nbytes
from ckptio.format.writer import publish_index, state_dict_of, write_shards
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord

__all__ = [
    "MIN_SPLIT_SHARD_SIZE",
    "WeightsPlan",
    "assign_shards",
    "plan_for_world",
    "plan_weights",
    "publish_weights_index",
    "shard_bytes",
    "split_shard_size",
    "write_weights_share",
]

logger = logging.getLogger(__name__)

#: The smallest shard a multi-rank save splits a model into to give more ranks work (64 MiB).
MIN_SPLIT_SHARD_SIZE = 64 * 2**20


def split_shard_size(
    total_bytes: int, world_size: int, max_shard_size: int, *, floor: int = MIN_SPLIT_SHARD_SIZE
) -> int:
    """The shard size for a model of ``total_bytes`` written by ``world_size`` ranks.

    ``max_shard_size`` in a world of one; otherwise small enough to give every
    rank a shard (``ceil(total_bytes / world_size)``), but not below ``floor``
    and never above ``max_shard_size``.

    Raises:
        InvalidArgumentError: a world size or shard size below 1.
    """
    if world_size < 1 or max_shard_size < 1:
        raise InvalidArgumentError(
            f"world_size and max_shard_size must be at least 1, got {world_size} and {max_shard_size}"
        )
    if world_size == 1:
        return max_shard_size
    per_rank = -(-max(total_bytes, 0) // world_size)
    return min(max_shard_size, max(per_rank, floor, 1))


def assign_shards(sizes: Mapping[str, int], world_size: int) -> tuple[tuple[str, ...], ...]:
    """Split shard files between ranks by bytes: largest first, each to the least-loaded rank.

    Deterministic (ties by file name, then the lower rank). Ranks may get no
    shard when there are fewer shards than ranks.

    Returns:
        For each rank, the (sorted) shard files it writes; together every file, once.
    """
    if world_size < 1:
        raise InvalidArgumentError(f"world_size must be at least 1, got {world_size}")
    loads = [0] * world_size
    shares: list[list[str]] = [[] for _ in range(world_size)]
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += size
    return tuple(tuple(sorted(share)) for share in shares)


def shard_bytes(shard_index: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of tensor data each shard file of ``shard_index`` holds."""
    sizes: dict[str, int] = {}
    for name, file_name in shard_index["weight_map"].items():
        sizes[file_name] = sizes.get(file_name, 0) + tensor_nbytes(state_dict[name])
    return sizes


@dataclass(frozen=True)
class WeightsPlan:
    """Rank 0's plan for the weights of a multi-rank save, shared with every rank.

    Attributes:
        shard_index: the index to publish after every shard is written.
        index_name: ``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``.
        safetensors: the shard format.
        assignments: for each rank, the shard files it writes.
    """

    shard_index: dict[str, Any]
    index_name: str
    safetensors: bool
    assignments: tuple[tuple[str, ...], ...]

    def files_of(self, rank: int) -> tuple[str, ...]:
        """The shard files ``rank`` writes."""
        return self.assignments[rank]


def plan_weights(
    module: nn.Module, *, world_size: int, safetensors: bool, max_shard_size: int
) -> WeightsPlan:
    """Plan the shard index of ``module`` and each rank's share of it (no I/O).

    Tied parameters are recorded and stored once, as by
    :func:`~ckptio.format.writer.write_model_weights`.
    """
    state_dict = state_dict_of(module)
    sharing = create_sharing_metadata(module)

    def plan(size: int) -> dict[str, Any]:
        return make_shard_index(
            [state_dict], None, safetensors=safetensors, max_shard_size=size, param_sharing_metadata=sharing
        )

    shard_index = plan(max_shard_size)
    size = split_shard_size(shard_index["metadata"]["total_size"], world_size, max_shard_size)
    if size != max_shard_size:
        shard_index = plan(size)
    assignments = assign_shards(shard_bytes(shard_index, state_dict), world_size)
    return WeightsPlan(shard_index, index_name_for(safetensors), safetensors, assignments)


def plan_for_world(
    module: nn.Module | None, world_size: int, *, safetensors: bool, max_shard_size: int
) -> WeightsPlan | None:
    """The plan for a save by ``world_size`` ranks; None with no model or in a world of one
    (rank 0 then writes the weights as :func:`~ckptio.format.writer.write_model_weights` does)."""
    if module is None or world_size == 1:
        return None
    return plan_weights(module, world_size=world_size, safetensors=safetensors, max_shard_size=max_shard_size)


def write_weights_share(
    storage: Storage, plan: WeightsPlan, module: nn.Module | Mapping[str, torch.Tensor], rank: int
) -> list[FileRecord]:
    """Write ``rank``'s shards of ``plan`` from this rank's replica of ``module`` (or its state dict); not the index.

    Called by every rank of the save (a rank with no shard writes nothing).

    Raises:
        InvalidArgumentError: this rank's model does not hold the planned tensors.
    """
    files = plan.files_of(rank)
    if not files:
        return []
    return write_shards(storage, plan.shard_index, state_dict_of(module), safetensors=plan.safetensors, files=files)


def publish_weights_index(storage: Storage, plan: WeightsPlan, records: Sequence[FileRecord]) -> FileRecord:
    """Publish the index of ``plan`` once every shard it names is among ``records`` (rank 0).

    Raises:
        InvalidArgumentError: a planned shard was not written (nothing is published).
    """
    written = {r.path for r in records}
    missing = sorted(set(plan.shard_index["weight_map"].values()) - written)
    if missing:
        raise InvalidArgumentError(
            f"cannot publish {storage.url_of(plan.index_name)!r}: shards {missing[:5]} were not written"
        )
    record = publish_index(storage, plan.index_name, plan.shard_index)
    logger.debug(
        "published %s naming %d shards written by %d ranks",
        storage.url_of(plan.index_name),
        len(written),
        sum(1 for share in plan.assignments if share),
    )
    return record
