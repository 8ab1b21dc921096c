"""Read model weights from Hugging Face shards into a module or a state dict.

Order of work, so that a bad checkpoint is refused before anything changes:

1. the index (or the single file's header) is read and validated;
2. key checks follow ``nn.Module.load_state_dict`` (``strict``): missing
   tensors are reported by name before any shard is read; tied aliases that
   a checkpoint stored once (``param_sharing``) or that transformers dropped
   (``_tied_weights_keys``) are not missing. Tensors an *index* holds that the
   module lacks are skipped (logged at DEBUG), as in the seed design, so a
   pipeline stage loads its own part of one shared index with ``strict=True``;
   a single weights file must match the module exactly;
3. safetensors headers are checked against the module's shapes and dtypes;
4. shards are read concurrently (a few at a time) and loaded as they arrive,
   so memory holds a few shards, not the model twice. On object stores each
   shard's byte ranges are fetched concurrently and copied, as they arrive,
   straight into the module's own parameters wherever ``load_state_dict``
   would only ``copy_`` into them (CPU, same dtype and shape, contiguous, no
   load hooks, ``assign=False``): one copy, and memory holds only the ranges
   in flight; other tensors take the ``load_state_dict`` path;
5. tied parameters are tied again (one Parameter per group).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ckptio.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    StateDictMismatchError,
)
from ckptio.format.constants import SAFE_WEIGHTS_NAME, WEIGHTS_NAME
from ckptio.format.index import read_index, validate_shard_file_name
from ckptio.format.layout import detect_layout
from ckptio.format.planner import PARAM_SHARING_KEY
from ckptio.format.safetensors_io import (
    SafetensorsHeader,
    read_header,
    read_safetensors,
)
from ckptio.format.sharing import (
    create_sharing_metadata,
    declared_aliases,
    merge_groups,
    module_tied_groups,
    retie_parameters,
)
from ckptio.format.torch_io import read_torch_file
from ckptio.storage import Storage
from ckptio.storage.transfer import map_unordered

__all__ = ["StateDictMismatchError", "load_weights", "read_model_weights", "read_state_dict"]

logger = logging.getLogger(__name__)

#: Shards read at once.
_READ_WORKERS = 4
#: Byte ranges in flight for one load, shared by the shards read at once (bounds the buffers held).
_RANGES_IN_FLIGHT = 8
_SHOW = 20


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _checkpoint_sharing(metadata: Mapping[str, Any], url: str) -> list[list[str]]:
    groups = metadata.get(PARAM_SHARING_KEY) or []
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups
    ):
        raise CorruptCheckpointError(f"index {url!r} has malformed {PARAM_SHARING_KEY!r} metadata: {groups!r}")
    return [list(g) for g in groups if len(g) > 1]


class _Catalog:
    """Where each stored tensor lives, plus safetensors headers fetched along the way."""

    def __init__(
        self,
        storage: Storage,
        weight_map: dict[str, str] | None,
        sharing: list[list[str]],
        *,
        from_index: bool,
        debug: bool = False,
    ) -> None:
        self.storage = storage
        self.weight_map = weight_map  # None: a single .bin file whose names are known only once loaded
        self.sharing = sharing
        self.from_index = from_index  # an index may hold more than one module (pipeline stages)
        self.log_level = logging.INFO if debug else logging.DEBUG
        self.headers: dict[str, SafetensorsHeader] = {}
        self.preloaded: dict[str, dict[str, torch.Tensor]] = {}

    def header(self, file_name: str) -> SafetensorsHeader:
        if file_name not in self.headers:
            self.headers[file_name] = read_header(self.storage, file_name)
        return self.headers[file_name]

    def fetch_headers(self, file_names: Iterable[str]) -> None:
        """Fetch the headers of several safetensors shards concurrently."""
        todo = sorted({f for f in file_names if f.endswith(".safetensors") and f not in self.headers})
        for name, header in map_unordered(lambda f: (f, read_header(self.storage, f)), todo, workers=_READ_WORKERS):
            self.headers[name] = header


def _open_catalog(storage: Storage, device: str | torch.device, debug: bool) -> _Catalog:
    meta = detect_layout(storage)
    if meta is None:
        raise CheckpointNotFoundError(
            f"cannot load model weights from {storage.url!r}: no index, {SAFE_WEIGHTS_NAME!r} or {WEIGHTS_NAME!r} there"
        )
    if meta.is_index:
        index = read_index(storage, meta.file_name)
        sharing = _checkpoint_sharing(index["metadata"], storage.url_of(meta.file_name))
        return _Catalog(storage, dict(index["weight_map"]), sharing, from_index=True, debug=debug)
    if meta.safetensors:
        catalog = _Catalog(storage, {}, [], from_index=False, debug=debug)
        header = catalog.header(meta.file_name)
        catalog.weight_map = dict.fromkeys(header.entries, meta.file_name)
        return catalog
    catalog = _Catalog(storage, None, [], from_index=False, debug=debug)
    loaded = read_torch_file(storage, meta.file_name, device=device)
    catalog.weight_map = dict.fromkeys(loaded, meta.file_name)
    catalog.preloaded[meta.file_name] = loaded
    return catalog


def _read_file(
    catalog: _Catalog,
    file_name: str,
    names: list[str],
    device: str | torch.device,
    out: Mapping[str, torch.Tensor] | None = None,
    *,
    files: int = 1,
) -> dict[str, torch.Tensor]:
    started = time.monotonic()
    if file_name in catalog.preloaded:
        loaded = catalog.preloaded[file_name]
        tensors = {n: loaded[n] for n in names}
    elif file_name.endswith(".safetensors"):
        header = catalog.headers.get(file_name)
        workers = max(1, _RANGES_IN_FLIGHT // min(files, _READ_WORKERS))
        tensors = read_safetensors(
            catalog.storage, file_name, names, device=device, header=header, out=out, workers=workers
        )
    else:
        tensors = read_torch_file(catalog.storage, file_name, names, device=device)
    logger.log(
        catalog.log_level,
        "read %s (%d tensors) in %.2fs",
        catalog.storage.url_of(file_name),
        len(tensors),
        time.monotonic() - started,
    )
    return tensors


def _by_file(weight_map: Mapping[str, str], names: Iterable[str]) -> list[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(weight_map[name], []).append(name)
    return sorted(grouped.items())


def _source_of(groups: Sequence[Sequence[str]], stored: Mapping[str, str]) -> dict[str, str]:
    """For each name of a group that has a stored member: the stored name it can be read from."""
    sources: dict[str, str] = {}
    for group in groups:
        stored_members = [n for n in group if n in stored]
        if stored_members:
            for name in group:
                sources.setdefault(name, name if name in stored else stored_members[0])
    return sources


def _read_state_dict(
    catalog: _Catalog, keys: Iterable[str] | None, device: str | torch.device
) -> dict[str, torch.Tensor]:
    weight_map = catalog.weight_map or {}
    sources = {n: n for n in weight_map} | _source_of(catalog.sharing, weight_map)
    wanted = list(keys) if keys is not None else list(sources)
    absent = [n for n in wanted if n not in sources]
    if absent:
        raise StateDictMismatchError(
            f"cannot load {_names(absent)} from {catalog.storage.url!r}: not in the checkpoint"
        )
    order = {name: i for i, name in enumerate(weight_map)}
    needed = sorted({sources[n] for n in wanted}, key=order.__getitem__)
    tensors: dict[str, torch.Tensor] = {}
    work = _by_file(weight_map, needed)
    for part in map_unordered(
        lambda item: _read_file(catalog, item[0], item[1], device, files=len(work)), work, workers=_READ_WORKERS
    ):
        tensors.update(part)
    return {n: tensors[sources[n]] for n in wanted}


def _check_shapes(catalog: _Catalog, targets: Mapping[str, torch.Tensor], loads: Mapping[str, str]) -> None:
    """Refuse shape or dtype-kind mismatches visible in safetensors headers, before any data is read."""
    catalog.fetch_headers(loads.values())
    problems: list[str] = []
    for name, file_name in loads.items():
        if not file_name.endswith(".safetensors"):
            continue
        entry = catalog.header(file_name).entries.get(name)
        target = targets[name]
        if entry is None or type(target) not in (torch.Tensor, nn.Parameter):
            continue
        shard = catalog.storage.url_of(file_name)
        if entry.shape != tuple(target.shape):
            problems.append(f"{name!r}: checkpoint shape {list(entry.shape)}, module {list(target.shape)} (in {shard})")
        elif (
            entry.dtype.is_floating_point != target.dtype.is_floating_point
            or entry.dtype.is_complex != target.dtype.is_complex
        ):
            problems.append(f"{name!r}: checkpoint dtype {entry.dtype}, module {target.dtype} (in {shard})")
    if problems:
        raise StateDictMismatchError(
            f"cannot load {catalog.storage.url!r} into the module: {'; '.join(problems[:_SHOW])}; "
            "the module was not modified"
        )


def _load_into(
    catalog: _Catalog,
    module: nn.Module,
    *,
    device: str | torch.device,
    strict: bool,
    assign: bool,
    keys: Iterable[str] | None,
) -> set[str]:
    """Load into ``module``; return the names of its state dict that were not loaded."""
    url = catalog.storage.url
    targets = module.state_dict(keep_vars=True)
    weight_map = catalog.weight_map or {}
    # transformers' declared ties only stand in for aliases the checkpoint dropped.
    hf_groups = [g for g in module_tied_groups(module) if g[1] not in weight_map]
    hf_aliases = {n for n in declared_aliases(module) if n not in weight_map}
    groups = merge_groups(catalog.sharing, create_sharing_metadata(module), hf_groups)
    sources = {n: n for n in weight_map} | _source_of(groups, weight_map)
    wanted = list(keys) if keys is not None else list(targets)
    missing = [n for n in wanted if n not in sources and n not in hf_aliases]
    unexpected = _unexpected(catalog, module, wanted if keys is not None else None, targets)
    if strict and (missing or unexpected):
        parts = [f"missing {_names(missing)}"] if missing else []
        parts += [f"unexpected {_names(unexpected)}"] if unexpected else []
        raise StateDictMismatchError(
            f"cannot load {url!r} into {type(module).__name__} (strict=True): {'; '.join(parts)}; "
            "nothing was loaded (pass strict=False to load what matches)"
        )
    # Load each stored tensor once, under a name the module has (tied names then share it).
    loads: dict[str, str] = {}
    for name in wanted:
        if name in targets and name in sources:
            stored = sources[name]
            target_name = stored if stored in targets else name
            loads.setdefault(stored, target_name)
    stored_files = {stored: weight_map[stored] for stored in loads}
    _check_shapes(catalog, {s: targets[t] for s, t in loads.items()}, stored_files)

    fill = {} if assign or torch.device(device).type != "cpu" else _fillable_targets(module, targets, loads)
    work = _by_file(weight_map, loads)
    for part in map_unordered(
        lambda item: _read_file(catalog, item[0], item[1], device, fill, files=len(work)),
        work,
        workers=_READ_WORKERS,
    ):
        # Tensors read straight into the module's memory are loaded already.
        renamed = {loads[stored]: tensor for stored, tensor in part.items() if tensor is not fill.get(stored)}
        if renamed:
            _check_loaded_shapes(url, renamed, targets)
            module.load_state_dict(renamed, strict=False, assign=assign)

    # Tie again, each group led by a member that was loaded.
    loaded_names = set(loads.values())
    retie_parameters(module, [sorted(g, key=lambda n: n not in loaded_names) for g in groups])
    tie_weights = getattr(module, "tie_weights", None)
    if callable(tie_weights) and any(n not in sources for n in hf_aliases):
        tie_weights()  # transformers 4 lists aliases without saying what they are tied to
    covered = {n for n in wanted if n in sources or n in hf_aliases}
    return {n for n in targets if n not in covered}


def _fillable_targets(
    module: nn.Module, targets: Mapping[str, torch.Tensor], loads: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Stored name -> the module's own parameter or buffer that may be filled without ``load_state_dict``.

    Only where ``load_state_dict`` would do nothing but ``copy_`` into it: no
    load hooks anywhere in the module (they may rewrite any key), no override of
    ``load_state_dict`` or of the owning submodule's ``_load_from_state_dict``
    (BatchNorm, quantized modules), and the state dict's value is the
    submodule's registered tensor itself. The reader still checks dtype, shape,
    device and layout per tensor (:func:`fills_in_place`) and falls back to
    ``load_state_dict`` for the rest.
    """
    if type(module).load_state_dict is not nn.Module.load_state_dict:
        return {}
    owners = dict(module.named_modules(remove_duplicate=False))
    if any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for m in owners.values()):
        return {}
    fill: dict[str, torch.Tensor] = {}
    for stored, name in loads.items():
        prefix, _, leaf = name.rpartition(".")
        owner = owners.get(prefix)
        target = targets[name]
        if (
            owner is not None
            and type(owner)._load_from_state_dict is nn.Module._load_from_state_dict
            and (owner._parameters.get(leaf) is target or owner._buffers.get(leaf) is target)
        ):
            fill[stored] = target
    return fill


def _unexpected(
    catalog: _Catalog, module: nn.Module, keys: list[str] | None, targets: Mapping[str, torch.Tensor]
) -> list[str]:
    """Names that strict loading refuses because the module lacks them.

    Names asked for by ``keys`` always count. Of the rest, only a single
    weights file's count: an index may describe more than this module (one
    shared index for all pipeline stages), so its other tensors are skipped.
    """
    if keys is not None:
        return [n for n in keys if n not in targets]
    extra = [n for n in catalog.weight_map or {} if n not in targets]
    if catalog.from_index and extra:
        logger.debug(
            "skipping %d tensors of %s that %s does not have: %s",
            len(extra),
            catalog.storage.url,
            type(module).__name__,
            _names(extra),
        )
        return []
    return extra


def _check_loaded_shapes(url: str, tensors: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> None:
    problems = [
        f"{n!r}: checkpoint shape {list(t.shape)}, module {list(targets[n].shape)}"
        for n, t in tensors.items()
        if type(targets[n]) in (torch.Tensor, nn.Parameter) and type(t) is torch.Tensor and t.shape != targets[n].shape
    ]
    if problems:
        raise StateDictMismatchError(f"cannot load {url!r}: {'; '.join(problems[:_SHOW])}")


def _catalog_of_index(storage: Storage, shard_index: Mapping[str, Any], debug: bool) -> _Catalog:
    weight_map = shard_index.get("weight_map")
    if not isinstance(weight_map, Mapping):
        raise InvalidArgumentError("shard_index has no 'weight_map' dict")
    for file_name in weight_map.values():
        validate_shard_file_name(file_name, storage.url)
    metadata = shard_index.get("metadata") or {}
    sharing = _checkpoint_sharing(metadata, storage.url)
    return _Catalog(storage, dict(weight_map), sharing, from_index=True, debug=debug)


def _catalog(
    storage: Storage, device: str | torch.device, shard_index: Mapping[str, Any] | None, debug: bool
) -> _Catalog:
    if shard_index is None:
        return _open_catalog(storage, device, debug)
    return _catalog_of_index(storage, shard_index, debug)


def read_state_dict(
    storage: Storage,
    *,
    device: str | torch.device = "cpu",
    keys: Iterable[str] | None = None,
    shard_index: Mapping[str, Any] | None = None,
    debug: bool = False,
) -> dict[str, torch.Tensor]:
    """Read the weights at the root of ``storage`` as ``{name: tensor}``.

    Args:
        device: where the loaded tensors are placed.
        keys: only these tensors (on object stores only their byte ranges are fetched).
        shard_index: read the shards this index names instead of the directory's own
            index (``load_sharded_checkpoint``).
        debug: log every file read at INFO level (else DEBUG).

    Raises:
        CheckpointNotFoundError: no weights or index file at the root.
        StateDictMismatchError: a name of ``keys`` is not in the checkpoint.
        CorruptCheckpointError: a malformed index, truncated or corrupt shard, unsafe pickle.
        ObjectNotFoundError: a shard the index names does not exist.
    """
    started = time.monotonic()
    result = _read_state_dict(_catalog(storage, device, shard_index, debug), keys, device)
    logger.debug("read %d tensors from %s in %.2fs", len(result), storage.url, time.monotonic() - started)
    return result


def load_weights(
    storage: Storage,
    module: nn.Module,
    *,
    device: str | torch.device = "cpu",
    strict: bool = True,
    assign: bool = False,
    keys: Iterable[str] | None = None,
    shard_index: Mapping[str, Any] | None = None,
    debug: bool = False,
) -> set[str]:
    """Load the weights at the root of ``storage`` into ``module``.

    Args:
        strict, assign: as in ``nn.Module.load_state_dict``; tensors an index
            holds that the module lacks are skipped even when strict.
        keys: only these names of the module.
        shard_index, device, debug: as in :func:`read_state_dict`.

    Returns:
        The names of ``module``'s state dict that were not loaded (empty when
        every one was; with ``strict=False`` the missing ones are here).

    Name, shape and dtype problems are raised before any tensor data is read,
    with the module untouched. Tensor data is written into the module as it
    arrives, so a read that fails part way (a shard cut short or replaced
    during the load, a storage error that outlasts the retries) leaves the
    module partly loaded: load again, or from another checkpoint.

    Raises:
        CheckpointNotFoundError: no weights or index file at the root.
        StateDictMismatchError: missing/unexpected names (strict), wrong shapes or dtypes.
        CorruptCheckpointError: a malformed index, truncated or corrupt shard, unsafe pickle.
        ObjectNotFoundError: a shard the index names does not exist.
    """
    started = time.monotonic()
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(f"cannot load into {type(module).__name__}: expected an nn.Module or None")
    catalog = _catalog(storage, device, shard_index, debug)
    unloaded = _load_into(catalog, module, device=device, strict=strict, assign=assign, keys=keys)
    logger.debug("loaded model weights from %s in %.2fs", storage.url, time.monotonic() - started)
    return unloaded


def read_model_weights(
    storage: Storage,
    module: nn.Module | None = None,
    *,
    device: str | torch.device = "cpu",
    strict: bool = True,
    assign: bool = False,
    keys: Iterable[str] | None = None,
    shard_index: Mapping[str, Any] | None = None,
    debug: bool = False,
) -> dict[str, torch.Tensor] | None:
    """Load into ``module`` (returns None), or return a state dict when it is None.

    See :func:`load_weights` and :func:`read_state_dict` for the arguments and errors.
    """
    if module is None:
        return read_state_dict(storage, device=device, keys=keys, shard_index=shard_index, debug=debug)
    load_weights(
        storage, module, device=device, strict=strict, assign=assign, keys=keys, shard_index=shard_index, debug=debug
    )
    return None
