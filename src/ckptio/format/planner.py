"""Plan how tensors are split into Hugging Face shard files. Pure: no I/O.

The plan *is* the index a save publishes last: ``{"metadata": {"total_size":
..., <caller metadata>, "param_sharing": [[name, alias, ...], ...]},
"weight_map": {tensor_name: shard_file}}``. It is computed from tensor sizes
alone (meta tensors plan as well as real ones), so every pipeline stage can
compute the same index and write only its own shards.

Splitting follows ``huggingface_hub``: tensors are taken in order and a new
shard starts when the next tensor would push the current one past
``max_shard_size``; a tensor bigger than the limit gets a shard of its own.
Each state dict of ``state_dictionaries`` (one per pipeline stage) gets its
own shard files, numbered after the previous stage's, so no shard is written
by two ranks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ckptio.errors import InvalidArgumentError
from ckptio.format.constants import shard_file_name

__all__ = ["PARAM_SHARING_KEY", "alias_names", "make_shard_index", "tensor_nbytes"]

#: Index metadata key under which groups of tied tensor names are recorded.
PARAM_SHARING_KEY = "param_sharing"
#: Index metadata keys the planner computes; caller values for them are replaced.
_COMPUTED_KEYS = frozenset({"total_size", PARAM_SHARING_KEY})


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies in a shard (its elements only, never the whole storage)."""
    return int(tensor.numel()) * tensor.element_size()


def alias_names(param_sharing: Sequence[Sequence[str]] | None) -> set[str]:
    """Names that are stored under another name: every member of a group but the first."""
    return {name for group in param_sharing or () for name in list(group)[1:]}


def _check_sharing(param_sharing: object) -> list[list[str]]:
    if param_sharing is None:
        return []
    if not isinstance(param_sharing, list | tuple) or not all(
        isinstance(g, list | tuple) and len(g) >= 2 and all(isinstance(n, str) for n in g) for g in param_sharing
    ):
        raise InvalidArgumentError(
            f"param_sharing_metadata must be a list of groups of two or more tensor names, got {param_sharing!r}"
        )
    return [list(g) for g in param_sharing]


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's metadata without the keys the planner computes itself.

    A loaded index's metadata holds ``total_size`` and ``param_sharing``; they
    are dropped here and recomputed, so re-saving with it describes the new save.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"metadata must be a dict, got {type(metadata).__name__}")
    caller = {key: value for key, value in metadata.items() if key not in _COMPUTED_KEYS}
    try:
        json.dumps(caller)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"metadata must be JSON-serialisable: {exc}") from exc
    return caller


def _split(sizes: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group names into shards in order, a new shard when the next tensor would overflow."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > max_shard_size:
            shards.append([name])  # too big for any shard: alone, never splitting the current one
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def make_shard_index(
    state_dictionaries: Sequence[Mapping[str, torch.Tensor]],
    metadata: Mapping[str, Any] | None = None,
    safetensors: bool = False,
    max_shard_size: int = 2**31,
    param_sharing_metadata: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Plan the shard files of one checkpoint; returns the index to publish last.

    Args:
        state_dictionaries: one state dict per part that is written
            independently (e.g. per pipeline stage); each gets its own shards.
        metadata: JSON-serialisable caller metadata stored in the index; its
            ``total_size`` and ``param_sharing`` (a loaded index's metadata has
            them) are recomputed.
        safetensors: name shards ``model-*.safetensors`` (else ``pytorch_model-*.bin``).
        max_shard_size: largest shard in bytes; a bigger tensor gets a shard of its own.
        param_sharing_metadata: groups of tied names (see
            :func:`~ckptio.format.sharing.create_sharing_metadata`), recorded as
            given as ``param_sharing``; of each group only the first name present
            in the state dicts is stored.

    Returns:
        ``{"metadata": {"total_size": int, ...}, "weight_map": {name: shard_file}}``.

    Raises:
        InvalidArgumentError: a name appears in two state dicts, a value is not a
            tensor, ``max_shard_size`` is not positive, or metadata is unusable.
    """
    if isinstance(state_dictionaries, Mapping):
        raise InvalidArgumentError("state_dictionaries must be a list of state dicts (one per stage), not a dict")
    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise InvalidArgumentError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    caller_metadata = _check_metadata(metadata)
    sharing = _check_sharing(param_sharing_metadata)

    names: set[str] = set()
    for stage in state_dictionaries:
        for name, tensor in stage.items():
            if not isinstance(tensor, torch.Tensor):
                raise InvalidArgumentError(f"cannot save {name!r}: expected a tensor, got {type(tensor).__name__}")
            if name in names:
                raise InvalidArgumentError(f"tensor {name!r} appears in more than one state dict")
            names.add(name)
    # Only names being saved can be aliases: each group's first saved member is the one stored.
    # The groups are recorded as given all the same: the caller's record of the model's ties.
    aliases = alias_names([[n for n in g if n in names] for g in sharing])

    stages: list[list[list[str]]] = []
    total_size = 0
    for stage in state_dictionaries:
        sizes = [(name, tensor_nbytes(tensor)) for name, tensor in stage.items() if name not in aliases]
        total_size += sum(size for _, size in sizes)
        stages.append(_split(sizes, max_shard_size))

    total_shards = sum(len(shards) for shards in stages)
    weight_map: dict[str, str] = {}
    number = 0
    for shards in stages:
        for shard_names in shards:
            number += 1
            file_name = shard_file_name(number, total_shards, safetensors=safetensors)
            weight_map.update(dict.fromkeys(shard_names, file_name))

    index_metadata: dict[str, Any] = {"total_size": total_size, **caller_metadata}
    if sharing:
        index_metadata[PARAM_SHARING_KEY] = sharing
    return {"metadata": index_metadata, "weight_map": weight_map}
