"""Rotation: which checkpoints to delete, and deleting them safely.

The policy (:func:`select_for_deletion`) is a pure function of the discovered
entries, tested without any storage:

* keep at most ``keep`` complete checkpoints *in total*, preserved (best)
  ones counted, as the Hugging Face Trainer does: the preserved ones and the
  newest are kept first, then the newest others until the limit is reached;
* never delete a preserved checkpoint (the best ones), nor the newest
  complete one, even when that leaves more than ``keep``;
* delete the leftovers of crashed saves: a ``checkpoint-*`` folder that is
  not complete, is *older* than the newest complete checkpoint, and holds
  only files a checkpoint save writes (weights, index, shards, component
  files, marker, metrics). A leftover newer than the newest complete one (by
  time or by number) is kept: it may be a save in progress in another process;
* never delete what cannot be judged: a checkpoint whose manifest or index is
  malformed, a folder holding anything a save does not write (logged), or one
  whose age is unknown.

:func:`maybe_delete_oldest_checkpoint` applies it to a run directory and
deletes with :func:`~ckptio.checkpoint.commit.delete_checkpoint` (manifest
first, so a half-deleted checkpoint never passes for a complete one).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from typing import Any

from ckptio.checkpoint.commit import delete_checkpoint
from ckptio.checkpoint.discovery import (
    CheckpointEntry,
    entry_sort_key,
    list_checkpoints,
)
from ckptio.checkpoint.layout import CHECKPOINTS_DIR, is_checkpoint_file, location_name
from ckptio.checkpoint.validate import CheckpointStatus
from ckptio.errors import InvalidArgumentError, StorageError
from ckptio.storage import Storage, resolve_storage

__all__ = [
    "checkpoint_names",
    "maybe_delete_oldest_checkpoint",
    "rotate_checkpoints",
    "select_for_deletion",
]

logger = logging.getLogger(__name__)


def _check_keep(keep: object) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidArgumentError(
            f"the number of checkpoints to keep must be an integer >= 1, got {keep!r}; "
            "a limit below 1 would delete every checkpoint, so nothing was deleted"
        )
    return keep


def checkpoint_names(checkpoints: str | os.PathLike[str] | Iterable[str] | None) -> set[str]:
    """Directory names of checkpoints given as names, paths or URLs (``".../checkpoint-7/"`` -> ``"checkpoint-7"``).

    A single path or name (not in a list) is one checkpoint, never a sequence of characters.
    """
    if checkpoints is None:
        return set()
    if isinstance(checkpoints, str | os.PathLike):
        checkpoints = [os.fspath(checkpoints)]
    return {location_name(c) for c in checkpoints if str(c).rstrip("/")}


def _is_leftover(entry: CheckpointEntry, newest: CheckpointEntry) -> bool:
    """Whether a not-complete entry is a crashed save's leftover that rotation may delete."""
    if entry.status is CheckpointStatus.COMPLETE or entry.error is not None or entry.time is None:
        return False
    number, newest_number = entry.checkpoint_id, newest.checkpoint_id
    if number is not None and newest_number is not None and number > newest_number:
        return False  # numbered after the newest: maybe a save in progress, whatever the clocks say
    if entry_sort_key(entry) >= entry_sort_key(newest):
        return False
    foreign = [o.key for o in entry.objects if not is_checkpoint_file(o.key)]
    if foreign or not entry.objects:
        logger.debug(
            "leaving %s alone: it is not a complete checkpoint but holds files a checkpoint save does not write (%s)",
            entry.url or entry.name,
            ", ".join(foreign[:5]) or "no listing",
        )
        return False
    return True


def select_for_deletion(entries: Iterable[CheckpointEntry], *, keep: int, preserved: set[str]) -> list[str]:
    """Return the names of the checkpoints rotation deletes, oldest first (no I/O).

    Args:
        entries: discovered checkpoints, in any order.
        keep: how many complete checkpoints to keep in total, preserved ones counted (>= 1).
        preserved: names never deleted (best checkpoints).

    Raises:
        InvalidArgumentError: ``keep`` is below 1 (nothing is selected).
    """
    keep = _check_keep(keep)
    ordered = sorted(entries, key=entry_sort_key)
    complete = [e for e in ordered if e.status is CheckpointStatus.COMPLETE]
    if not complete:
        return []
    newest = complete[-1]
    kept = {e.name for e in complete if e.name in preserved} | {newest.name}
    for entry in reversed(complete):
        if len(kept) >= keep:
            break
        kept.add(entry.name)
    return [
        e.name
        for e in ordered
        if e.name not in kept and (e.status is CheckpointStatus.COMPLETE or _is_leftover(e, newest))
    ]


def rotate_checkpoints(
    storage: Storage, entries: Iterable[CheckpointEntry], *, keep: int, preserved: set[str]
) -> list[str]:
    """Delete what :func:`select_for_deletion` selects among ``entries`` (already discovered).

    A checkpoint whose deletion fails is logged (WARNING) and skipped; once
    its manifest is gone it is incomplete, and the next rotation finishes it.

    Returns:
        The names of the deleted checkpoints, oldest first.
    """
    deleted: list[str] = []
    for name in select_for_deletion(entries, keep=keep, preserved=preserved):
        checkpoint = storage.child(f"{CHECKPOINTS_DIR}/{name}")
        try:
            delete_checkpoint(checkpoint)
        except StorageError as exc:
            logger.warning("could not delete %s during rotation: %s; the next rotation retries it", checkpoint.url, exc)
            continue
        logger.debug("deleted old checkpoint %s", checkpoint.url)
        deleted.append(name)
    return deleted


def maybe_delete_oldest_checkpoint(
    model_dir: str | os.PathLike[str] | Storage,
    max_checkpoints: int,
    best_checkpoint: str | os.PathLike[str] | Iterable[str] | None = None,
    preserved_checkpoints: str | os.PathLike[str] | Iterable[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Delete the checkpoints under ``<model_dir>/checkpoints`` that rotation selects.

    Call it only after the newest checkpoint is committed. See
    :func:`select_for_deletion` for the policy. Costs one listing of
    ``checkpoints/`` plus the deletes (batched per checkpoint).

    Args:
        model_dir: the run's output directory (local path, URL or Storage).
        max_checkpoints: how many complete checkpoints to keep in total,
            preserved ones counted (>= 1).
        best_checkpoint: deprecated alias (the seed design's) for one preserved
            checkpoint, merged into ``preserved_checkpoints`` (a list given here
            is taken as preserved checkpoints, without a warning).
        preserved_checkpoints: checkpoints never deleted, as names, paths or
            URLs; a single path is one checkpoint.
        storage_options: fsspec options for the backend.

    Returns:
        The names of the deleted checkpoints, oldest first.

    Raises:
        InvalidArgumentError: ``max_checkpoints`` is below 1; nothing is deleted.
    """
    keep = _check_keep(max_checkpoints)
    preserved = checkpoint_names(preserved_checkpoints)
    if best_checkpoint is not None and not isinstance(best_checkpoint, str | os.PathLike):
        preserved |= checkpoint_names(best_checkpoint)  # a list in third place: the preserved list
    elif best_checkpoint is not None:
        warnings.warn(
            "maybe_delete_oldest_checkpoint(best_checkpoint=...) is deprecated; "
            "pass preserved_checkpoints=[...] instead",
            DeprecationWarning,
            stacklevel=2,
        )
        preserved |= checkpoint_names(best_checkpoint)
    storage = resolve_storage(model_dir, storage_options)
    return rotate_checkpoints(storage, list_checkpoints(storage), keep=keep, preserved=preserved)
