"""Hugging Face ``Trainer`` checkpoints committed to any storage, and resumed from there.

::

    from ckptio.integrations.transformers import CkptioCallback, fetch_latest_checkpoint

    resume = fetch_latest_checkpoint("s3://bucket/run", "/tmp/run")  # None on a fresh run
    trainer = Trainer(..., args=TrainingArguments("/tmp/run", save_steps=500, save_total_limit=2),
                      callbacks=[CkptioCallback("s3://bucket/run")])
    trainer.train(resume_from_checkpoint=resume)

The Trainer keeps writing its checkpoints to local disk (``args.output_dir/checkpoint-<step>``);
:class:`CkptioCallback` commits each one to ``<output_url>/checkpoints/checkpoint-<step>``,
ckptio's run layout, so ``ckptio ls``, :func:`~ckptio.find_latest_checkpoint`,
:func:`~ckptio.checkpoint.list_checkpoints` and rotation see them like any other checkpoint.
Each remote folder holds the Trainer's files byte for byte plus ``checkpoint_manifest.json``,
written last, listing every file with its size and CRC32C (ckptio's commit protocol, see
:mod:`ckptio.checkpoint.commit`): a folder whose upload was interrupted has no manifest and is
never fetched. :func:`fetch_latest_checkpoint` only reads the bucket.

Needs ``pip install 'ckptio[transformers]'`` (``transformers`` and ``accelerate``).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import torch

from ckptio.checkpoint import (
    CHECKPOINTS_DIR,
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    CheckpointEntry,
    CheckpointManifest,
    begin_checkpoint,
    checkpoint_dir_name,
    checkpoint_key,
    checkpoint_names,
    commit_checkpoint,
    delete_checkpoint,
    entry_sort_key,
    list_checkpoints,
    rotate_checkpoints,
    scan_latest_complete,
    utc_timestamp,
)
from ckptio.checkpoint.copy import copy_checkpoint, copy_object, copy_order
from ckptio.errors import (
    CheckpointError,
    CkptioError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    MissingDependencyError,
    ObjectNotFoundError,
    StorageError,
)
from ckptio.format.writer import write_with_retries
from ckptio.storage import LocalStorage, Storage, resolve_storage
from ckptio.storage.base import TEMP_PREFIX
from ckptio.storage.integrity import FileRecord, checksum_object
from ckptio.storage.transfer import map_concurrently

try:
    import transformers
    from transformers import (
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        f"ckptio.integrations.transformers needs transformers: {_exc}; pip install 'ckptio[transformers]'"
    ) from _exc

__all__ = ["STAGING_DIR", "CkptioCallback", "fetch_latest_checkpoint"]

logger = logging.getLogger(__name__)

#: Folder of ``args.output_dir`` holding the hard-linked copy of a checkpoint while it uploads.
STAGING_DIR = ".ckptio-upload"
#: Files uploaded (or downloaded) at once on object stores; local disk and memory take one at a time.
_FILE_CONCURRENCY = 8
#: Attempts of a fetch whose checkpoint is rotated away (by a still-running writer) while it downloads.
_FETCH_ATTEMPTS = 3


# -- upload ---------------------------------------------------------------------------------
def _snapshot(source: str, staging: str) -> None:
    """Hard-link every file of ``source`` into ``staging`` (a copy where links are refused).

    Links cost no bytes and no time, and keep the files' contents alive when the Trainer
    deletes ``source`` (its own ``save_total_limit`` rotation) while the upload runs.
    """
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    for dirpath, _, filenames in os.walk(source):
        target_dir = os.path.join(staging, os.path.relpath(dirpath, source))
        os.makedirs(target_dir, exist_ok=True)
        for name in filenames:
            src, dst = os.path.join(dirpath, name), os.path.join(target_dir, name)
            try:
                os.link(src, dst)
            except OSError:  # a filesystem without hard links: copy (costs the training loop a copy)
                shutil.copy2(src, dst)


def _upload_file(src: Storage, dst: Storage, key: str) -> FileRecord:
    """Upload one file: checksum it, then stream it with ``ckptio cp``'s :func:`copy_object`, which
    checks that the bytes sent are the bytes checksummed before publishing; retried whole when transient."""
    record = checksum_object(src, key)

    def write() -> FileRecord:
        copy_object(src, dst, key, record.crc32c, size=record.size)
        return record

    return write_with_retries(dst, key, write)


def _upload_checkpoint(local_dir: str, storage: Storage, name: str, *, step: int, world_size: int) -> None:
    """Commit the Trainer checkpoint in ``local_dir`` to ``<storage>/checkpoints/<name>``.

    Marker first, every file in parallel (up to the backend's :meth:`Storage.concurrency`),
    manifest last. A folder already there under that name (a run restarted from scratch into the
    same ``output_url``) is deleted first, manifest first, so it is never complete with mixed files.
    """
    src = LocalStorage(local_dir)
    dst = storage.child(checkpoint_key(name))
    if dst.list_objects(""):
        logger.warning("replacing %s: the Trainer wrote a new %s", dst.url, name)
        delete_checkpoint(dst)
    claim = begin_checkpoint(dst, checkpoint_id=step, world_size=world_size).keep_alive()
    try:
        keys = [k for k in copy_order(src.walk("")) if k != MANIFEST_NAME]
        records = map_concurrently(
            lambda key: _upload_file(src, dst, key),
            keys,
            workers=dst.concurrency(_FILE_CONCURRENCY),
            thread_name="ckptio-upload",
        )
        manifest = CheckpointManifest(
            checkpoint_path=checkpoint_key(name),
            world_size=world_size,
            timestamp=utc_timestamp(),
            checkpoint_id=step,
            files=records,
            metadata={"written_by": "transformers.Trainer", "transformers_version": transformers.__version__},
        )
        commit_checkpoint(dst, manifest, claim)
    finally:
        claim.release()
    logger.info("committed %s (%d files, %d bytes)", dst.url, len(records), manifest.total_size)


def _stale_uploads(entries: Iterable[CheckpointEntry]) -> list[str]:
    """Folders of uploads that never committed (in-progress marker, no manifest) and are older and
    numbered lower than the newest complete checkpoint: what a killed upload leaves.

    Core rotation leaves them alone because they hold files it does not know (the Trainer's
    ``optimizer.pt``, ``trainer_state.json``, ...); one numbered after the newest complete
    checkpoint may be an upload in progress and is kept.
    """
    ordered = sorted(entries, key=entry_sort_key)
    complete = [e for e in ordered if e.is_complete]
    newest = complete[-1] if complete else None
    newest_id = newest.checkpoint_id if newest is not None else None
    if newest is None or newest_id is None:
        return []
    return [
        e.name
        for e in ordered
        if not e.is_complete
        and e.error is None
        and e.checkpoint_id is not None
        and e.checkpoint_id < newest_id
        and entry_sort_key(e) < entry_sort_key(newest)
        and any(o.key == IN_PROGRESS_NAME for o in e.objects)
    ]


def _rotate(storage: Storage, keep: int, preserved: set[str]) -> None:
    """Keep the newest ``keep`` complete checkpoints (preserved ones counted and never deleted),
    and delete what killed uploads left behind."""
    entries = list_checkpoints(storage)
    deleted = rotate_checkpoints(storage, entries, keep=keep, preserved=preserved)
    for name in _stale_uploads(entries):
        delete_checkpoint(storage.child(f"{CHECKPOINTS_DIR}/{name}"))
        deleted.append(name)
    if deleted:
        logger.info("rotation under %s deleted %s", storage.url, ", ".join(deleted))


class CkptioCallback(TrainerCallback):
    """Commit every checkpoint the ``Trainer`` saves to ``output_url``, in the background.

    At each save (``on_save``, on the world's process zero) the callback hard-links the files of
    ``args.output_dir/checkpoint-<global_step>`` into ``args.output_dir/.ckptio-upload/`` (no bytes
    are copied, so this takes no longer than listing the folder) and starts one thread that
    uploads them to ``<output_url>/checkpoints/checkpoint-<global_step>`` and returns at once:
    training goes on while the upload runs. The thread writes ckptio's in-progress marker, uploads
    every file (several at once on object stores, each checksummed and published atomically),
    then the manifest listing every file with its size and CRC32C: the commit point. Only then
    does it rotate: with ``save_total_limit`` (this argument, else ``args.save_total_limit``) it
    deletes all but the newest that many complete checkpoints under ``output_url``, never the
    Trainer's best checkpoint, plus the folders of uploads that never committed. The links keep
    the files alive even when the Trainer's own rotation deletes the local folder meanwhile.

    The thread is joined at the next ``on_save`` (so at most one upload runs; training waits
    there only if an upload takes longer than ``save_steps`` steps) and at ``on_train_end``, and
    an upload's failure is raised there: a :class:`~ckptio.errors.CkptioError` naming the remote
    checkpoint (a ckptio error keeps its class, any other becomes a
    :class:`~ckptio.errors.CheckpointError`), with the original as its cause. The failed folder
    holds no manifest, so it is never fetched and earlier checkpoints stay usable. When training
    raises, ``on_train_end`` is not called: :meth:`wait` joins the upload (the thread is not a
    daemon, so the interpreter also waits for it at exit).

    Only the world's process zero uploads, what it sees in ``args.output_dir``, after a barrier
    of all ranks (when ``torch.distributed`` is initialized) so that every rank has written its
    files; on several nodes without a shared filesystem, the other nodes' files are not uploaded.

    Args:
        output_url: where the run's checkpoints go: a local path, an fsspec URL
            (``s3://bucket/run``), or a :class:`~ckptio.storage.Storage`.
        storage_options: fsspec options for ``output_url`` (credentials, ``endpoint_url``).
        save_total_limit: complete checkpoints kept under ``output_url`` (>= 1); None follows
            ``args.save_total_limit`` (no rotation when that is None or below 1).

    Raises:
        InvalidArgumentError: ``save_total_limit`` is below 1.
    """

    def __init__(
        self,
        output_url: str | os.PathLike[str] | Storage,
        storage_options: dict[str, Any] | None = None,
        save_total_limit: int | None = None,
    ) -> None:
        if save_total_limit is not None and (
            isinstance(save_total_limit, bool) or not isinstance(save_total_limit, int) or save_total_limit < 1
        ):
            raise InvalidArgumentError(
                f"save_total_limit must be None or an integer >= 1, got {save_total_limit!r}; "
                "a limit below 1 would delete every checkpoint"
            )
        self.storage = resolve_storage(output_url, storage_options)
        self.save_total_limit = save_total_limit
        #: URL of the last checkpoint this callback committed, None before the first.
        self.last_committed: str | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending_url = ""

    # -- the background upload ------------------------------------------------------------
    def _run(self, staging: str, name: str, step: int, world_size: int, keep: int | None, preserved: set[str]) -> None:
        url = self.storage.url_of(checkpoint_key(name))
        try:
            _upload_checkpoint(staging, self.storage, name, step=step, world_size=world_size)
            self.last_committed = url
            if keep is not None:
                try:
                    _rotate(self.storage, keep, preserved)
                except StorageError as exc:  # committed already; the next save rotates again
                    logger.warning("rotation under %s failed after committing %s: %s", self.storage.url, url, exc)
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that joins
            self._error = exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                os.rmdir(os.path.dirname(staging))
            except OSError:
                pass  # another upload's folder, or already gone

    def wait(self) -> None:
        """Join the upload in progress, if any, and raise its failure.

        Raises:
            CkptioError: the upload failed; the remote checkpoint is not committed.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join()
        error, self._error = self._error, None
        if error is None:
            return
        if not isinstance(error, Exception):
            raise error  # SimulatedCrash, KeyboardInterrupt: not an upload failure
        message = (
            f"upload of {self._pending_url} failed: {error}; it is not committed (never fetched), "
            "earlier checkpoints there are untouched"
        )
        if isinstance(error, CkptioError):
            raise error.with_message(message) from error
        raise CheckpointError(f"{message} ({type(error).__name__})") from error

    @property
    def uploading(self) -> bool:
        """Whether an upload is running."""
        return self._thread is not None and self._thread.is_alive()

    # -- TrainerCallback --------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Start committing the checkpoint just saved; first join (and check) the previous upload."""
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its files (rng_state_<rank>.pth) to the folder
        if not state.is_world_process_zero:
            return
        self.wait()
        name = checkpoint_dir_name(state.global_step)
        run_dir = args.output_dir or "trainer_output"  # the Trainer's own default
        local = os.path.join(run_dir, name)
        if not os.path.isdir(local):
            raise CheckpointError(
                f"the Trainer saved no {local!r} to upload (hyperparameter search writes elsewhere); "
                f"nothing was uploaded to {self.storage.url}"
            )
        staging = os.path.join(run_dir, STAGING_DIR, f"{name}-{uuid.uuid4().hex[:8]}")
        try:
            _snapshot(local, staging)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"cannot stage {local!r} for upload: {exc}; nothing was uploaded") from exc
        limit = self.save_total_limit if self.save_total_limit is not None else args.save_total_limit
        keep = limit if limit is not None and limit >= 1 else None
        preserved = checkpoint_names(state.best_model_checkpoint)
        self._pending_url = self.storage.url_of(checkpoint_key(name))
        self._thread = threading.Thread(
            target=self._run,
            args=(staging, name, state.global_step, max(1, int(args.world_size)), keep, preserved),
            name=f"ckptio-upload-{name}",
            daemon=False,
        )
        self._thread.start()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Join the last upload and raise its failure."""
        self.wait()


# -- fetch ----------------------------------------------------------------------------------
def _latest_committed(storage: Storage) -> tuple[str, CheckpointManifest] | None:
    """Name and manifest of the newest complete checkpoint that has a manifest (a bare weights
    folder never counts)."""
    latest = scan_latest_complete(storage).latest_complete
    if latest is None or latest.manifest is None:  # look at them all (reads every manifest once)
        committed = [e for e in list_checkpoints(storage) if e.is_complete and e.manifest is not None]
        latest = committed[-1] if committed else None
    return (latest.name, latest.manifest) if latest is not None and latest.manifest is not None else None


def _matches(local_dir: str, manifest: CheckpointManifest) -> bool:
    """Whether ``local_dir`` already holds every file of ``manifest`` with its size and CRC32C."""
    local = LocalStorage(local_dir)
    sizes = {o.key: o.size for o in local.list_objects("")}
    return all(
        sizes.get(r.path) == r.size and checksum_object(local, r.path).crc32c == r.crc32c for r in manifest.files
    )


def _download(storage: Storage, name: str, manifest: CheckpointManifest, local_dir: str) -> str:
    """Copy ``entry`` into ``local_dir/<name>`` with ``ckptio cp``'s :func:`copy_checkpoint` (every
    file checked against its manifest CRC32C, manifest last), through a hidden folder renamed into
    place at the end; a fetch interrupted there resumes from it the next time."""
    src = storage.child(f"{CHECKPOINTS_DIR}/{name}")
    target = os.path.join(local_dir, name)
    if os.path.isdir(target) and _matches(target, manifest):
        logger.info("%s already holds %s", target, src.url)
        return target
    partial = os.path.join(local_dir, f"{TEMP_PREFIX}fetch-{name}")
    copy_checkpoint(src, LocalStorage(partial), overwrite=True)
    if os.path.lexists(target):  # a stale or partial copy: replaced whole
        stale = f"{partial}-stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(partial, target)
    logger.info("fetched %s into %s (%d files)", src.url, target, len(manifest.files))
    return target


def fetch_latest_checkpoint(
    output_url: str | os.PathLike[str] | Storage,
    local_dir: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """Download the newest complete checkpoint under ``output_url`` for the Trainer to resume.

    The newest folder of ``<output_url>/checkpoints/checkpoint-*`` (ckptio discovery: manifest
    timestamp, then step) that is committed: a manifest is there and every file it lists has the
    listed size. Folders without a manifest (an interrupted upload, a bare weights folder) are
    never fetched. Each file is checked against its manifest size and CRC32C while it downloads;
    everything lands in a hidden folder of ``local_dir`` (``.ckptio-tmp-fetch-checkpoint-<N>``)
    renamed to ``local_dir/checkpoint-<N>`` at the end (a folder already there is replaced, or
    kept when it already matches the manifest), so an interrupted fetch never leaves a half
    folder under that name, and the next fetch reuses what it had downloaded. Nothing in
    ``output_url`` is written or deleted. A checkpoint rotated away while it downloads (a writer
    still running) makes the fetch start over with the newer one.

    Args:
        output_url: the ``output_url`` given to :class:`CkptioCallback` (path, URL or Storage).
        local_dir: local folder to download into (created if missing); usually ``args.output_dir``.
        storage_options: fsspec options for ``output_url``.

    Returns:
        ``local_dir/checkpoint-<N>``, for ``trainer.train(resume_from_checkpoint=...)``; None
        when ``output_url`` holds no committed checkpoint.

    Raises:
        CorruptCheckpointError: a file does not match its manifest (nothing is left under the
            checkpoint's name in ``local_dir``; the hidden folder keeps only checked files).
        StorageError: the storage failed.
    """
    storage = resolve_storage(output_url, storage_options)
    local = os.fspath(local_dir)
    attempt = 1
    while True:
        latest = _latest_committed(storage)
        if latest is None:
            return None
        name, manifest = latest
        try:
            return _download(storage, name, manifest, local)
        except (ObjectNotFoundError, IncompleteCheckpointError):  # rotated away meanwhile: fetch the newer one
            if attempt >= _FETCH_ATTEMPTS:
                raise
            attempt += 1
            logger.info("%s disappeared under %s while it was fetched; looking again", name, storage.url)
