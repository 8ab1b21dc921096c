"""The commit protocol of a checkpoint directory, the same on local disk and object stores.

Saving ``checkpoint-N``:

1. :func:`begin_checkpoint` writes ``checkpoint_in_progress.json`` before
   anything else. From then on the directory is *incomplete*, whatever else
   it holds.
2. The writers publish every file (each one atomically, see
   :mod:`ckptio.storage`): model shards, the shard index, component state.
3. :func:`commit_checkpoint` writes ``checkpoint_manifest.json`` **last**.
   That single atomic object write is the commit point. The marker is removed
   afterwards; a marker left next to a manifest (a crash between the two) is
   harmless, because the manifest wins.

Why a commit *object* rather than the POSIX idiom of writing into a temporary
directory and renaming it into place: object stores (S3, GCS) have no
directory rename. A "rename" there is a copy of every object followed by a
delete, neither atomic nor cheap, and a crash in the middle leaves two half
checkpoints. A single object write *is* atomic on every backend, so the
manifest object is the commit record: readers trust a directory only when its
manifest is there and every file it lists has the listed size
(:mod:`ckptio.checkpoint.validate`). The marker makes the state of a crashed
save unambiguous even after its model weights were fully written (weights
alone would otherwise look like a plain, valid model directory).

Deleting a checkpoint runs the protocol backwards (:func:`delete_checkpoint`):
write the marker, delete the manifest, delete every other file, delete the
marker last. At every instant the directory is either complete (manifest still
there) or incomplete (marker there), never a half-deleted directory that
passes for a complete one.
"""

from __future__ import annotations

import logging

from ckptio.checkpoint.claim import STALE_AFTER_S, SaveClaim, claim_marker, marker_bytes
from ckptio.checkpoint.layout import IN_PROGRESS_NAME, MANIFEST_NAME
from ckptio.checkpoint.manifest import CheckpointManifest
from ckptio.errors import (
    CheckpointExistsError,
    InvalidArgumentError,
    ObjectExistsError,
    StorageError,
)
from ckptio.storage import Storage

__all__ = ["begin_checkpoint", "commit_checkpoint", "delete_checkpoint", "is_committed"]

logger = logging.getLogger(__name__)


def begin_checkpoint(
    storage: Storage,
    *,
    checkpoint_id: int | str | None,
    world_size: int,
    stale_after_s: float = STALE_AFTER_S,
) -> SaveClaim:
    """Claim a checkpoint directory for this save; call before writing anything else.

    Called once, by global rank 0, and every other rank must wait for it
    (barrier) before writing. The marker is created only if absent; a marker
    left by a save that is no longer running is taken over, one of a live save
    is never touched (:mod:`ckptio.checkpoint.claim`).

    Args:
        storage: the checkpoint directory.
        checkpoint_id: the step number or name of the checkpoint (recorded for humans).
        world_size: the number of ranks that will write (recorded for humans).
        stale_after_s: how old a marker's heartbeat must be for its save to count as dead.

    Returns:
        The claim: pass it to :func:`commit_checkpoint`; call its ``keep_alive()``
        for a save that may take longer than ``stale_after_s``.

    Raises:
        InvalidArgumentError: ``world_size`` is below 1.
        ConcurrentSaveError: another save is writing this directory; nothing was written.
        StorageError: the marker could not be written; nothing else was.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgumentError(f"world_size must be a positive integer, got {world_size!r}")
    claim = claim_marker(storage, checkpoint_id=checkpoint_id, world_size=world_size, stale_after_s=stale_after_s)
    logger.debug("began checkpoint %s", storage.url)
    return claim


def commit_checkpoint(storage: Storage, manifest: CheckpointManifest, claim: SaveClaim | None = None) -> None:
    """Commit a checkpoint: publish its manifest, then remove the in-progress marker.

    Call it once, on global rank 0, after every rank has finished writing every
    file the manifest lists. The manifest write is atomic and is the commit
    point: if the process dies before it, the checkpoint stays incomplete and
    the previous checkpoint is what resumes; if it dies after it, the
    checkpoint is complete (a leftover marker does not matter).

    The manifest is *created*, never overwritten: if another saver committed
    this directory first, its manifest stays and this commit fails. With the
    ``claim`` of :func:`begin_checkpoint`, the marker must still hold its token
    (one read): a save whose directory another saver took over is not
    committed. The claim is released either way.

    Raises:
        ConcurrentSaveError: another saver took the directory over; nothing was committed.
        CheckpointExistsError: a manifest is already there (another saver
            committed first); it is left untouched.
        StorageError: the manifest could not be written; the checkpoint stays
            incomplete and earlier checkpoints are untouched.
    """
    try:
        if claim is not None:
            claim.verify()
        _create_manifest(storage, manifest)
    finally:
        if claim is not None:
            claim.release()
    try:
        storage.delete(IN_PROGRESS_NAME, missing_ok=True)
    except StorageError as exc:  # committed already: a leftover marker is harmless
        logger.warning("checkpoint %s is committed but its in-progress marker remains: %s", storage.url, exc)
    logger.debug("committed checkpoint %s (%d files)", storage.url, len(manifest.files))


def _create_manifest(storage: Storage, manifest: CheckpointManifest) -> None:
    data = manifest.to_bytes()
    try:
        storage.create_exclusive(MANIFEST_NAME, data)
    except ObjectExistsError as exc:
        # A retried create whose first response was lost finds its own manifest: that is a success.
        try:
            ours = storage.read_bytes(MANIFEST_NAME) == data
        except StorageError:
            ours = False
        if not ours:
            raise CheckpointExistsError(
                f"cannot commit {storage.url!r}: a manifest is already there (another saver committed first); "
                "it is left untouched and this save is not committed"
            ) from exc


def is_committed(storage: Storage) -> bool:
    """Whether the directory has a manifest (its files are not checked; see ``checkpoint_status``)."""
    return storage.is_file(MANIFEST_NAME)


def delete_checkpoint(storage: Storage) -> None:
    """Delete a whole checkpoint directory, never leaving a directory that looks complete.

    Writes the in-progress marker, deletes the manifest, deletes every other
    object (in batches where the backend has a batch delete), and deletes the
    marker (and, on local disk, the directory) last. A crash at any point
    leaves an incomplete checkpoint, which later rotation removes.

    Raises:
        StorageError: a delete failed; what remains is marked incomplete.
    """
    storage.write_bytes(IN_PROGRESS_NAME, marker_bytes(checkpoint_id=None, world_size=None, action="delete"))
    storage.delete(MANIFEST_NAME, missing_ok=True)
    others = [key for key in storage.walk("") if key not in (IN_PROGRESS_NAME, MANIFEST_NAME)]
    storage.delete_many(others)  # one batch request per 1,000 objects on S3 and GCS
    storage.delete_prefix("")
    logger.debug("deleted checkpoint %s", storage.url)
