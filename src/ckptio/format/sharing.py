"""Tied (shared) parameters: detect them, store them once, tie them again on load.

A module whose ``lm_head.weight`` *is* ``transformer.wte.weight`` (the same
Parameter object) has one tensor under two names. A checkpoint stores it once,
under the first name, and records the group in the index metadata as
``param_sharing``: ``[["transformer.wte.weight", "lm_head.weight"], ...]``.
On load, :func:`retie_parameters` makes every name of a group refer to one
Parameter again, so training keeps them tied.

Hugging Face checkpoints drop tied aliases without recording them; the module
then says which names are tied through ``all_tied_weights_keys`` /
``_tied_weights_keys`` (transformers), which :func:`module_tied_groups` reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ckptio.errors import InvalidArgumentError

__all__ = [
    "create_sharing_metadata",
    "declared_aliases",
    "merge_groups",
    "module_tied_groups",
    "retie_parameters",
]


def _same_memory_key(tensor: torch.Tensor) -> tuple[object, ...] | None:
    """A key equal for two tensors that view exactly the same elements, else None."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def create_sharing_metadata(module: nn.Module | Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Return groups of names that refer to one shared tensor, in state-dict order.

    For a module, parameters and buffers are grouped by identity (the same
    Parameter object registered under several names). For a plain state dict,
    entries are grouped when they view exactly the same memory (same storage,
    offset, shape, stride and dtype), which is what a tied module's
    ``state_dict()`` returns. Only names of the state dict are reported; the
    first name of each group is the one a checkpoint stores.

    Returns:
        A JSON-serialisable list of groups, each two or more names.
    """
    groups: dict[object, list[str]] = {}
    if isinstance(module, nn.Module):
        saved = set(module.state_dict(keep_vars=True))
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            if name in saved and tensor is not None:
                groups.setdefault(id(tensor), []).append(name)
        order = {name: i for i, name in enumerate(module.state_dict(keep_vars=True))}
        found = [sorted(g, key=order.__getitem__) for g in groups.values() if len(g) > 1]
    elif isinstance(module, Mapping):
        for name, tensor in module.items():
            key = _same_memory_key(tensor) if isinstance(tensor, torch.Tensor) else None
            if key is not None:
                groups.setdefault(key, []).append(name)
        order = {name: i for i, name in enumerate(module)}
        found = [g for g in groups.values() if len(g) > 1]
    else:
        raise InvalidArgumentError(f"expected an nn.Module or a state dict, got {type(module).__name__}")
    return sorted(found, key=lambda g: order[g[0]])


def _split_name(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def retie_parameters(module: nn.Module, sharing_metadata: Sequence[Sequence[str]] | None) -> None:
    """Make every name of each group refer to the first name's Parameter (or buffer).

    Groups naming something the module does not have are skipped, so a
    checkpoint's groups can be applied to a module that lacks some names.

    Args:
        module: the module to re-tie in place.
        sharing_metadata: groups of names, as :func:`create_sharing_metadata` returns.
    """
    for group in sharing_metadata or ():
        names = list(group)
        source = _lookup(module, names[0])
        if source is None:
            continue
        for alias in names[1:]:
            owner_name, attr = _split_name(alias)
            try:
                owner = module.get_submodule(owner_name)
            except AttributeError:
                continue
            if attr in owner._parameters and isinstance(source, nn.Parameter):
                owner._parameters[attr] = source
            elif attr in owner._buffers and not isinstance(source, nn.Parameter):
                owner._buffers[attr] = source
            elif attr in owner._parameters or attr in owner._buffers:
                raise InvalidArgumentError(
                    f"cannot tie {alias!r} to {names[0]!r}: one is a parameter, the other a buffer"
                )


def _lookup(module: nn.Module, name: str) -> torch.Tensor | None:
    owner_name, attr = _split_name(name)
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        return None
    found: torch.Tensor | None = owner._parameters.get(attr)
    if found is None:
        found = owner._buffers.get(attr)
    return found


def _declared(module: nn.Module) -> object:
    # transformers 5 computes all_tied_weights_keys from the config (empty when
    # tie_word_embeddings=False); the class attribute lists ties regardless.
    if hasattr(module, "all_tied_weights_keys"):
        return module.all_tied_weights_keys
    return getattr(module, "_tied_weights_keys", None)


def module_tied_groups(module: nn.Module) -> list[list[str]]:
    """Groups of tied names a transformers model declares, ``[source, alias]`` each.

    Reads ``all_tied_weights_keys`` (transformers 5) or ``_tied_weights_keys``
    when it is a mapping ``{alias: source}``; names that are not in the state
    dict (e.g. regex patterns) are ignored. A plain list of alias names
    (transformers 4) cannot say what each is tied to: see :func:`declared_aliases`.
    """
    declared = _declared(module)
    if not isinstance(declared, Mapping):
        return []
    names = set(module.state_dict(keep_vars=True))
    return [
        [source, alias]
        for alias, source in declared.items()
        if isinstance(alias, str) and isinstance(source, str) and alias in names and source in names
    ]


def declared_aliases(module: nn.Module) -> set[str]:
    """State-dict names a transformers model lists as tied aliases (any form)."""
    declared = _declared(module)
    if not isinstance(declared, Iterable) or isinstance(declared, str):
        return set()
    names = set(module.state_dict(keep_vars=True))
    return {n for n in declared if isinstance(n, str) and n in names}


def merge_groups(*group_lists: Iterable[Sequence[str]]) -> list[list[str]]:
    """Union overlapping groups (keeping first-seen order of names)."""
    merged: list[list[str]] = []
    for groups in group_lists:
        for group in groups:
            hits = [m for m in merged if any(n in m for n in group)]
            combined: list[str] = []
            for part in [*hits, list(group)]:
                combined.extend(n for n in part if n not in combined)
            merged = [m for m in merged if all(m is not h for h in hits)] + [combined]
    return [g for g in merged if len(g) > 1]
