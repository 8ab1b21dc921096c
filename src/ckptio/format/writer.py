"""Write model weights as Hugging Face shards: shards first, the index last.

The index is the commit: it is published only after every shard it names is
complete, so a crashed save is never taken for a complete one. Files of an
earlier save that the new index does not name are removed only after the new
index is published.

A shard whose stream fails transiently (a timeout, a 5xx, throttling) is
written again from its first byte, with the storage's retry policy: a
streaming upload cannot resume mid-way, and the failed attempt published
nothing.

Re-saving *in place* reuses the Hugging Face shard names, so a crash in the
middle of overwriting a shard of the same name leaves the previous index
pointing at a mix of old and new shards; save each checkpoint into a fresh
directory (as the checkpoint manager does) when that matters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ckptio.errors import CkptioError, InvalidArgumentError, TransientStorageError
from ckptio.format.constants import SAFETENSORS_METADATA, index_name_for
from ckptio.format.index import (
    index_shard_files,
    serialize_index,
    validate_shard_file_name,
)
from ckptio.format.layout import stale_weight_files
from ckptio.format.planner import PARAM_SHARING_KEY, alias_names, make_shard_index
from ckptio.format.safetensors_io import check_writable, write_safetensors
from ckptio.format.sharing import create_sharing_metadata
from ckptio.format.torch_io import write_torch_file
from ckptio.storage import RetryPolicy, Storage, is_transient
from ckptio.storage.integrity import FileRecord, checksum_bytes
from ckptio.storage.retry import exhausted_error
from ckptio.storage.transfer import map_concurrently
from ckptio.storage.wrapper import retrying_storage_of

__all__ = [
    "publish_index",
    "remove_stale_weight_files",
    "state_dict_of",
    "write_model_weights",
    "write_shards",
    "write_with_retries",
]

logger = logging.getLogger(__name__)

#: Shards uploaded at once to object stores (each holds one upload buffer).
_UPLOAD_WORKERS = 4


def state_dict_of(module: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to save: ``module.state_dict()``, or the dict itself.

    Raises:
        InvalidArgumentError: not a module or a dict of tensors.
    """
    if isinstance(module, nn.Module):
        return module.state_dict()
    if isinstance(module, Mapping):
        for name, value in module.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise InvalidArgumentError(
                    f"cannot save entry {name!r}: a state dict maps str to Tensor, got {type(value).__name__}"
                )
        return dict(module)
    raise InvalidArgumentError(f"expected an nn.Module or a dict of tensors, got {type(module).__name__}")


def _format_of(file_name: str) -> bool:
    """True for a safetensors shard, False for a PyTorch one."""
    return file_name.endswith(".safetensors")


def _shard_contents(
    shard_index: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], url: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Map each shard file holding any of ``state_dict``'s tensors to its full contents."""
    weight_map: Mapping[str, str] = shard_index["weight_map"]
    aliases = alias_names(shard_index.get("metadata", {}).get(PARAM_SHARING_KEY))
    unplanned = [n for n in state_dict if n not in weight_map and n not in aliases]
    if unplanned:
        raise InvalidArgumentError(f"cannot save to {url!r}: the shard index has no place for {unplanned[:10]}")
    files = {weight_map[n] for n in state_dict if n in weight_map}
    contents: dict[str, dict[str, torch.Tensor]] = {f: {} for f in sorted(files)}
    for name, file_name in weight_map.items():
        if file_name not in contents:
            continue
        if name not in state_dict:
            raise InvalidArgumentError(
                f"cannot write shard {file_name!r} to {url!r}: it must hold {name!r}, which this module does not "
                "have; every shard is written whole by the one rank that holds all its tensors"
            )
        contents[file_name][name] = state_dict[name]
    return contents


def write_with_retries(
    storage: Storage,
    key: str,
    write: Callable[[], FileRecord],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> FileRecord:
    """Call ``write`` (one whole streamed object), again from scratch after a transient failure.

    A failed stream is aborted by the writer, so nothing of a failed attempt is
    published. Other errors propagate unchanged.

    Raises:
        TransientStorageError: the failure was still transient after the
            policy's attempts or deadline (naming the object's URL).
    """
    retrying = retrying_storage_of(storage)
    policy = retrying.policy if retrying is not None else RetryPolicy()
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            if policy.gives_up(attempt, started):
                if isinstance(exc, TransientStorageError):
                    exc.retries_exhausted = True  # spent here: no outer layer retries it again
                    raise
                if isinstance(exc, CkptioError):
                    raise
                raise exhausted_error(
                    f"cannot write {storage.url_of(key)!r}: still failing after {attempt} attempts "
                    f"({type(exc).__name__}: {exc}); nothing was published under that name"
                ) from exc
            delay = policy.delay(attempt - 1)
            logger.debug("writing %s again in %.2fs after a transient failure: %s", storage.url_of(key), delay, exc)
            if retrying is not None:
                retrying.count_retry()
            sleep(delay)


def write_shards(
    storage: Storage,
    shard_index: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    safetensors: bool | None = None,
    debug: bool = False,
    files: Collection[str] | None = None,
) -> list[FileRecord]:
    """Write the shards of ``shard_index`` that hold ``state_dict``'s tensors; not the index.

    Each shard is streamed and published atomically. Uploads to object stores
    run a few shards at a time.

    Args:
        safetensors: the format the caller expects; must match the shard file
            names (None: take it from them).
        files: write only these shard files (each one the index names for
            ``state_dict``'s tensors), e.g. this rank's share when the ranks of
            a data-parallel job split the shards of one replicated model
            between them; None writes every shard that holds its tensors.

    Raises:
        InvalidArgumentError: ``state_dict`` holds tensors the index does not
            place, lacks tensors of a shard it would write, the format
            disagrees with the shard names, or ``files`` names a shard that
            holds none of ``state_dict``'s tensors.
    """
    contents = _shard_contents(shard_index, state_dict, storage.url)
    if files is not None:
        unknown = sorted(set(files) - set(contents))
        if unknown:
            raise InvalidArgumentError(
                f"cannot write {[storage.url_of(f) for f in unknown[:5]]}: the shard index places none of "
                f"the state dict's tensors there; it names {sorted(contents)[:10]}; nothing was written"
            )
        contents = {f: contents[f] for f in sorted(set(files))}
    # Refuse bad input before the first byte goes out, so no existing shard is replaced.
    for file_name, tensors in contents.items():
        validate_shard_file_name(file_name, storage.url)
        if safetensors is not None and _format_of(file_name) != safetensors:
            raise InvalidArgumentError(
                f"cannot write {storage.url_of(file_name)!r} with safetensors={safetensors}: "
                "the shard index was planned for the other format"
            )
        if _format_of(file_name):
            for name, tensor in tensors.items():
                check_writable(name, tensor, storage.url_of(file_name))
    level = logging.INFO if debug else logging.DEBUG

    def write_once(file_name: str, tensors: dict[str, torch.Tensor]) -> FileRecord:
        if _format_of(file_name):
            return write_safetensors(storage, file_name, tensors, metadata=SAFETENSORS_METADATA)
        return write_torch_file(storage, file_name, tensors)

    def write(item: tuple[str, dict[str, torch.Tensor]]) -> FileRecord:
        file_name, tensors = item
        started = time.monotonic()
        record = write_with_retries(storage, file_name, lambda: write_once(file_name, tensors))
        logger.log(
            level,
            "wrote %s (%d tensors, %d bytes) in %.2fs",
            storage.url_of(file_name),
            len(tensors),
            record.size,
            time.monotonic() - started,
        )
        return record

    items = list(contents.items())
    return map_concurrently(write, items, workers=storage.concurrency(_UPLOAD_WORKERS), thread_name="ckptio-shard")


def publish_index(storage: Storage, index_name: str, shard_index: Mapping[str, Any]) -> FileRecord:
    """Publish ``shard_index`` as ``index_name`` atomically (the commit of a save)."""
    url = storage.url_of(index_name)
    for file_name in shard_index["weight_map"].values():
        validate_shard_file_name(file_name, url)
    data = serialize_index(dict(shard_index))
    storage.write_bytes(index_name, data)
    return FileRecord(index_name, len(data), checksum_bytes(data))


def remove_stale_weight_files(storage: Storage, index_name: str, shard_index: Mapping[str, Any]) -> list[str]:
    """Delete weight, index and shard files the published index does not name; return them.

    Only files at the root of ``storage`` whose names follow the Hugging Face
    patterns are candidates; anything else (optimizer state, configs) is kept.
    Call it only after the index is published.
    """
    keep = {index_name, *index_shard_files(dict(shard_index))}
    # Old indexes go first: an index left behind by a crash must never name deleted shards
    # (a loader prefers a safetensors index over a PyTorch one, whichever is newer).
    stale = sorted(stale_weight_files(storage.list(""), keep), key=lambda name: not name.endswith(".index.json"))
    for name in stale:
        storage.delete(name)
    if stale:
        logger.debug("removed %d stale weight files of an earlier save from %s", len(stale), storage.url)
    return stale


def _sharing_for(
    module: nn.Module | Mapping[str, torch.Tensor],
    include_param_sharing: bool,
    param_sharing_metadata: Sequence[Sequence[str]] | None,
) -> Sequence[Sequence[str]] | None:
    if not include_param_sharing:
        return None
    if param_sharing_metadata is not None:
        return param_sharing_metadata
    return create_sharing_metadata(module)


def write_model_weights(
    storage: Storage,
    module: nn.Module | Mapping[str, torch.Tensor],
    *,
    safetensors: bool = True,
    max_shard_size: int = 2**31,
    metadata: dict[str, Any] | None = None,
    include_param_sharing: bool = True,
    param_sharing_metadata: Sequence[Sequence[str]] | None = None,
    debug: bool = False,
) -> list[FileRecord]:
    """Write ``module``'s weights into the root of ``storage``: shards, then the index.

    Tied tensors are stored once and recorded as ``param_sharing`` (unless
    ``include_param_sharing`` is False, which stores every name). Weight files
    of an earlier save that the new index does not name are deleted after the
    index is published. Called by one process (rank 0 of a data-parallel run).

    Returns:
        A record per file written (shards, then the index), paths relative to the root.

    Raises:
        InvalidArgumentError: unusable module, metadata or shard size; a tensor
            safetensors cannot hold. Nothing is published then.
    """
    started = time.monotonic()
    state_dict = state_dict_of(module)
    sharing = _sharing_for(module, include_param_sharing, param_sharing_metadata)
    shard_index = make_shard_index(
        [state_dict], metadata, safetensors=safetensors, max_shard_size=max_shard_size, param_sharing_metadata=sharing
    )
    records = write_shards(storage, shard_index, state_dict, safetensors=safetensors, debug=debug)
    index_name = index_name_for(safetensors)
    records.append(publish_index(storage, index_name, shard_index))
    remove_stale_weight_files(storage, index_name, shard_index)
    logger.debug(
        "saved model weights to %s (%d files, %d bytes) in %.2fs",
        storage.url,
        len(records),
        sum(r.size for r in records),
        time.monotonic() - started,
    )
    return records
