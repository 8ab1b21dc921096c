"""Rotation: which checkpoints to delete, and deleting them safely.

The policy (:func:`select_for_deletion`) is a pure function of the discovered
entries, tested without any storage:

* keep the newest ``keep`` complete checkpoints;
* never delete a preserved checkpoint (the best ones), nor the newest
  complete one, whatever ``keep`` says;
* delete incomplete checkpoints *older* than the newest complete one: they
  are leftovers of crashed saves. An incomplete checkpoint newer than the
  newest complete one (by time or by number) is kept: it may be a save in
  progress in another process;
* never delete what cannot be judged: a checkpoint whose manifest or index is
  malformed, a directory that is not recognisably a checkpoint, or one whose
  age is unknown.

:func:`maybe_delete_oldest_checkpoint` applies it to a run directory and
deletes with :func:`~ckptio.checkpoint.commit.delete_checkpoint` (manifest
first, so a half-deleted checkpoint never passes for a complete one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from ckptio.checkpoint.commit import delete_checkpoint
from ckptio.checkpoint.discovery import (
    CheckpointEntry,
    entry_sort_key,
    list_checkpoints,
)
from ckptio.checkpoint.layout import CHECKPOINTS_DIR, location_name
from ckptio.checkpoint.validate import CheckpointStatus
from ckptio.errors import InvalidArgumentError, StorageError
from ckptio.storage import Storage, resolve_storage

__all__ = ["checkpoint_names", "maybe_delete_oldest_checkpoint", "select_for_deletion"]

logger = logging.getLogger(__name__)


def _check_keep(keep: object) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidArgumentError(
            f"the number of checkpoints to keep must be an integer >= 1, got {keep!r}; "
            "a limit below 1 would delete every checkpoint, so nothing was deleted"
        )
    return keep


def checkpoint_names(checkpoints: Iterable[str] | None) -> set[str]:
    """Directory names of checkpoints given as names, paths or URLs (``".../checkpoint-7/"`` -> ``"checkpoint-7"``)."""
    return {location_name(c) for c in checkpoints or () if str(c).rstrip("/")}


def select_for_deletion(entries: Iterable[CheckpointEntry], *, keep: int, preserved: set[str]) -> list[str]:
    """Return the names of the checkpoints rotation deletes, oldest first (no I/O).

    Args:
        entries: discovered checkpoints, in any order.
        keep: how many of the newest complete checkpoints to keep (>= 1).
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
    newest_key = entry_sort_key(newest)
    kept = {e.name for e in complete[-keep:]} | set(preserved) | {newest.name}

    def is_stale_leftover(entry: CheckpointEntry) -> bool:
        if entry.status is not CheckpointStatus.INCOMPLETE or entry.error is not None or entry.time is None:
            return False
        number, newest_number = entry.checkpoint_id, newest.checkpoint_id
        if number is not None and newest_number is not None and number > newest_number:
            return False  # numbered after the newest: maybe a save in progress, whatever the clocks say
        return entry_sort_key(entry) < newest_key

    return [
        e.name
        for e in ordered
        if e.name not in kept and (e.status is CheckpointStatus.COMPLETE or is_stale_leftover(e))
    ]


def maybe_delete_oldest_checkpoint(
    model_dir: str | os.PathLike[str] | Storage,
    max_checkpoints: int,
    preserved_checkpoints: Iterable[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Delete the checkpoints under ``<model_dir>/checkpoints`` that rotation selects.

    Call it only after the newest checkpoint is committed. See
    :func:`select_for_deletion` for the policy. A checkpoint whose deletion
    fails is logged (WARNING) and skipped; once its manifest is gone it is
    incomplete, and the next rotation finishes it.

    Args:
        model_dir: the run's output directory (local path, URL or Storage).
        max_checkpoints: how many of the newest complete checkpoints to keep (>= 1).
        preserved_checkpoints: checkpoints never deleted, as names, paths or URLs.
        storage_options: fsspec options for the backend.

    Returns:
        The names of the deleted checkpoints, oldest first.

    Raises:
        InvalidArgumentError: ``max_checkpoints`` is below 1; nothing is deleted.
    """
    keep = _check_keep(max_checkpoints)
    storage = resolve_storage(model_dir, storage_options)
    entries = list_checkpoints(storage)
    deleted: list[str] = []
    for name in select_for_deletion(entries, keep=keep, preserved=checkpoint_names(preserved_checkpoints)):
        checkpoint = storage.child(f"{CHECKPOINTS_DIR}/{name}")
        try:
            delete_checkpoint(checkpoint)
        except StorageError as exc:
            logger.warning("could not delete %s during rotation: %s; the next rotation retries it", checkpoint.url, exc)
            continue
        logger.info("deleted old checkpoint %s", checkpoint.url)
        deleted.append(name)
    return deleted
