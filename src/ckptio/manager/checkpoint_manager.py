"""The checkpoint manager: save and restore *all* trainer state, on any storage.

A save runs the commit protocol of :mod:`ckptio.checkpoint.commit` across
every rank:

1. global rank 0 writes the in-progress marker into
   ``<output_dir>/checkpoints/checkpoint-<id>/``; every rank waits for it;
2. the model weights are written as Hugging Face shards: by rank 0 alone
   (index last) in a world of one; split between the ranks, each writing a
   distinct share of the shards from its replica, in a world of several (see
   :mod:`ckptio.manager.weights`); every rank writes the components its
   sharing pattern assigns to it;
3. the ranks exchange the records (size, CRC32C) of what they wrote; rank 0
   publishes the shard index (when the ranks split the shards) and then
   writes ``checkpoint_manifest.json`` last: that object is the commit;
4. only then are older checkpoints rotated out.

A crash anywhere before step 3 leaves a directory that discovery treats as
incomplete, so ``load_checkpoint(None)`` resumes from the previous complete
checkpoint. Nothing is ever renamed, so the protocol is the same on local disk
and on object stores.

An asynchronous save (``CheckpointConfig.async_save``) takes every rank's
state on the caller's thread (component ``state_dict()`` calls and the
replication checks are collectives of the training loop's process group) and
stages it into host buffers (:class:`~ckptio.state.staging.StateStager`); the
ranks agree that every one of them staged, and the steps above then run on a
background thread (:mod:`ckptio.manager.background`), whose exchanges between
ranks go over a gloo process group of their own, so they never interleave with
the training loop's collectives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import torch

from ckptio._version import __version__
from ckptio.checkpoint import (
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    METRICS_NAME,
    CheckpointEntry,
    CheckpointManifest,
    CheckpointStatus,
    begin_checkpoint,
    checkpoint_key,
    commit_checkpoint,
    encode_metrics,
    find_latest_checkpoint,
    inspect_checkpoint,
    location_name,
    parse_checkpoint_id,
    read_manifest,
    rotate_checkpoints,
    save_checkpoint_metrics,
    scan_checkpoints,
    scan_latest_complete,
    utc_timestamp,
    validate_checkpoint,
    verify_checkpoint,
)
from ckptio.checkpoint.best import BestEntry, infer_greater_is_better, rank_best
from ckptio.checkpoint.claim import SaveClaim, refuse_if_claimed
from ckptio.checkpoint.layout import IN_PROGRESS_NAME
from ckptio.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    StorageError,
)
from ckptio.format import (
    create_sharing_metadata,
    write_model_weights,
)
from ckptio.format.writer import state_dict_of
from ckptio.manager.background import BackgroundSave
from ckptio.manager.components import (
    ComponentFile,
    PendingComponent,
    manifest_entries,
    take_component_states,
    write_component_states,
)
from ckptio.manager.config import CheckpointConfig
from ckptio.manager.export import save_sharded_model
from ckptio.manager.failures import on_every_rank, on_rank0
from ckptio.manager.model_dir import save_model_directory
from ckptio.manager.progress import with_progress
from ckptio.manager.restore import restore_state
from ckptio.manager.sharded import (
    SHARDED_STATE_KEY,
    ShardedState,
    is_sharded_model,
    split_optimizers,
    take_sharded_state,
    write_sharded_state,
)
from ckptio.manager.weights import (
    WeightsPlan,
    plan_for_world,
    publish_weights_index,
    write_weights_share,
)
from ckptio.state import StateComponent, StatefulProvider, World, process_groups_of
from ckptio.state.staging import StateStager
from ckptio.storage import ObjectInfo, Storage, open_storage
from ckptio.storage.integrity import FileRecord, checksum_bytes
from ckptio.storage.multipart import DEFAULT_UPLOAD_BUDGET
from ckptio.storage.probe import probe_writable
from ckptio.storage.transfer import rate_summary, run_both
from ckptio.storage.wrapper import with_retries

__all__ = ["CheckpointManager"]

logger = logging.getLogger(__name__)

#: Manifest metadata key of the checkpoint marked with :meth:`CheckpointManager.set_best_checkpoint`.
_BEST_MARK = "best_checkpoint"
_SAVE_SAFE = "earlier checkpoints are intact"
#: Host memory an async save leaves free besides its staging copy (256 MiB).
_STAGING_MARGIN = 256 * 2**20


@dataclass
class _Outcome:
    """What one rank reports after writing: its files."""

    weights: list[FileRecord] = field(default_factory=list)
    components: list[ComponentFile] = field(default_factory=list)
    #: What the manifest records when the model and its optimizers were written sharded (through DCP).
    sharded: dict[str, Any] | None = None


@dataclass(frozen=True)
class _SaveState:
    """What one rank writes: model weights (None: no model, or sharded), their ties, its component
    states, and a sharded model's state with its optimizers' (None: the model is not sharded)."""

    weights: Mapping[str, torch.Tensor] | None
    sharing: list[list[str]] | None
    components: list[PendingComponent]
    sharded: ShardedState | None = None


@dataclass(frozen=True)
class _Ledger:
    """The manager's bookkeeping as it was when a save was asked for (a background save must not see later changes)."""

    best_checkpoints: list[BestEntry]
    best_checkpoint: str | None
    preserved: set[str]
    metrics: dict[str, float]


@dataclass(frozen=True)
class _SavePlan:
    """Rank 0's decisions before a save, shared with every rank."""

    path: str
    #: The run's checkpoints as listed before the save (None when no rotation follows).
    entries: list[CheckpointEntry] | None
    #: The target folder's objects when that listing covered it (() for a new folder), else None.
    target_objects: tuple[ObjectInfo, ...] | None = None
    #: How the ranks split the weight shards (None: rank 0 writes them all, as in a world of one).
    weights: WeightsPlan | None = None


class CheckpointManager:
    """Saves and restores model, optimizer, scheduler, data position, RNG and progress.

    Every rank of a job constructs one and calls :meth:`save_checkpoint` /
    :meth:`load_checkpoint` together; a single process is a world of one.
    Only global rank 0 lists checkpoints, reads manifests and rotates; it
    shares what it found with the other ranks, so the storage requests of a
    save or a resume do not grow with the world size, nor with the number of
    checkpoints already in the run (one listing of ``checkpoints/``).
    """

    def __init__(
        self,
        config: CheckpointConfig,
        stateful_provider: StatefulProvider | None,
        model: torch.nn.Module | None = None,
        *,
        storage: Storage | None = None,
    ) -> None:
        """Args:
            config: where and how to write.
            stateful_provider: gives the state components (None: model only).
            model: the model whose weights every checkpoint holds.
            storage: use this storage for ``config.output_dir`` instead of opening
                it (e.g. a :class:`~ckptio.storage.FaultInjectingStorage` in tests).
        """
        self.config = config
        self.provider = stateful_provider
        self.model = model
        # Retry at the outermost layer, so that faults raised by wrappers around
        # the backend (fault injection, counters) are retried like the backend's own.
        self.storage: Storage = with_retries(storage or self._open(config.output_dir), config.retry)
        self.best_checkpoints: list[BestEntry] = []
        self.best_checkpoint: str | None = None
        self.loaded_manifest: CheckpointManifest | None = None
        self._background = BackgroundSave()
        self._background_world: World | None = None
        # An async save holds one copy of the state, plus (on object stores) the upload part buffers
        # and a margin for the training step's own allocations.
        reserve = _STAGING_MARGIN + (DEFAULT_UPLOAD_BUDGET.limit if self.storage.is_remote else 0)
        self._stager = StateStager(reserve=reserve)
        if config.write_probe and self.storage.is_remote:
            self._probe_output_dir()

    def _probe_output_dir(self) -> None:
        """Rank 0 writes and deletes one small object in ``output_dir`` (:func:`probe_writable`), so
        bad credentials or a missing bucket fail now, on every rank, before training starts."""
        on_rank0(
            self._world(),
            lambda: probe_writable(self.storage),
            action=f"cannot use {self.storage.url!r} as output_dir",
            safe="nothing was written",
        )

    # -- lifecycle -----------------------------------------------------------
    def wait_until_finished(self) -> None:
        """Block until the pending asynchronous save is committed; raise its error (once).

        Returns at once when no save is pending (always, without ``async_save``).

        Raises:
            CkptioError: the pending save failed; it names the checkpoint, which
                was not committed (earlier checkpoints are intact).
        """
        self._background.wait()

    @property
    def save_in_progress(self) -> bool:
        """Whether an asynchronous save is still being written (never blocks)."""
        return self._background.running

    def close(self) -> None:
        """Wait for the pending save (raising its error), then release the background
        thread and the staging buffers. The manager can still be used afterwards."""
        try:
            self._background.close()
        finally:
            self._stager.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already on its way: report a failed save without masking it
            self.close()
        except Exception as close_error:  # noqa: BLE001 - logged; the original exception propagates
            logger.error("while handling %s: %s", exc_type.__name__, close_error)

    # -- helpers -----------------------------------------------------------
    def _world(self) -> World:
        return World.current(process_groups_of(self.provider))

    def _components(self) -> list[StateComponent]:
        return list(self.provider.get_state_components()) if self.provider is not None else []

    def _unwrapped_model(self) -> torch.nn.Module | None:
        model = self.model
        return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def _key_below_output(self, path: str) -> str | None:
        """``path`` relative to the output dir, or None when it lies elsewhere."""
        root = self.storage.url.rstrip("/") + "/"
        return path[len(root) :] if path.startswith(root) else None

    def _is_run_checkpoint(self, path: str) -> bool:
        """Whether ``path`` is a folder of this run's ``<output_dir>/checkpoints/`` (what discovery sees)."""
        return self._key_below_output(path) == checkpoint_key(location_name(path))

    def _locate(self, checkpoint: str) -> str:
        """The full path of a checkpoint given as a path or URL, or as a bare name.

        A bare name (no ``/``: ``"checkpoint-7"``, or ``"7"``) always means
        ``<output_dir>/checkpoints/checkpoint-<id>``, never a path relative to
        the working directory.
        """
        text = str(checkpoint)
        if "/" not in text and "\\" not in text:
            return self.storage.url_of(checkpoint_key(text))
        return text

    def _checkpoint_storage(self, path: str, manifest: CheckpointManifest | None = None) -> Storage:
        """The storage of a checkpoint: below the output dir when it is there, else opened anew; reporting
        ``config.progress`` of a save's writes, or of a load's reads given the checkpoint's ``manifest``."""
        key = self._key_below_output(path)
        storage = self.storage.child(key) if key is not None else with_retries(self._open(path), self.config.retry)
        return with_progress(storage, self.config.progress, manifest=manifest)

    def _open(self, path: str) -> Storage:
        return open_storage(path, retry=self.config.retry, **(self.config.storage_options or {}))

    # -- saving ------------------------------------------------------------
    def save_checkpoint(
        self,
        checkpoint_path: str | None = None,
        checkpoint_id: int | str | None = None,
        *,
        metrics: dict[str, float] | None = None,
    ) -> str:
        """Write a complete checkpoint and return its path or URL.

        Called by every rank. With neither argument the checkpoint goes to
        ``<output_dir>/checkpoints/checkpoint-<n>`` with ``n`` one past the
        highest existing number. A complete checkpoint already at the target
        is never overwritten (:class:`CheckpointExistsError`); an incomplete
        leftover of a crashed save with the same name is replaced. Older
        checkpoints are rotated out only after this one is committed.

        Requests: rank 0 lists ``checkpoints/`` once (reading only manifests
        it has not seen before) and the target once; no rank stats a file.

        With ``config.async_save`` it returns once the state is staged (copied
        into host buffers): the files and the manifest are written in the
        background, and changing the model or any component afterwards does
        not change what this checkpoint holds. A pending save is waited for
        first, and its error raised here instead of saving.

        Raises:
            CkptioError: on every rank, of the class the failing rank raised,
                naming that rank; earlier checkpoints are intact.
            InsufficientMemoryError: (async) the staging copy would not fit in
                host memory; nothing was written.
        """
        self._background.wait()
        started = time.monotonic()
        world = self._world()
        plan = on_rank0(
            world,
            lambda: self._plan_save(checkpoint_path, checkpoint_id, world),
            action="cannot save a checkpoint",
            safe=_SAVE_SAFE,
        )
        ledger = _Ledger(list(self.best_checkpoints), self.best_checkpoint, self._preserved(), dict(metrics or {}))
        if not self.config.async_save:
            self._write_and_commit(world, plan, ledger, lambda: self._take_state(world, plan.path, stage=False), started)
            return plan.path
        # Asynchronous: take and stage the state here (collectives on this thread), agree that every
        # rank staged it, then write and commit in the background, exchanging on a group of its own.
        staged = on_every_rank(
            world,
            lambda: self._take_state(world, plan.path, stage=True),
            action=f"cannot save {plan.path!r}",
            safe=_SAVE_SAFE,
            share=False,
        )[0]
        if self._background_world is None:
            self._background_world = world.on_own_group(self.config.async_timeout_s)
        background_world = self._background_world

        blocked = time.monotonic() - started

        def write_and_commit() -> None:
            self._write_and_commit(background_world, plan, ledger, lambda: staged, started, blocked=blocked)

        self._background.start(plan.path, write_and_commit)
        logger.debug("staged checkpoint %s in %.2fs; writing it in the background", plan.path, blocked)
        return plan.path

    def _take_state(self, world: World, path: str, *, stage: bool) -> _SaveState:
        """This rank's model weights and component states; with ``stage``, private copies of them."""
        model = self._unwrapped_model()
        components = self._components()
        sharded: ShardedState | None = None
        if model is not None and is_sharded_model(model):
            optimizers, components = split_optimizers(components)
            sharded, weights, sharing = take_sharded_state(model, optimizers), None, None
        else:
            weights = state_dict_of(model) if model is not None else None
            sharing = create_sharing_metadata(model) if model is not None else None
        pending = take_component_states(components, world)
        if not stage:
            return _SaveState(weights, sharing, pending, sharded)
        parts: dict[str, Any] = {"components": [c.state for c in pending]}
        if weights is not None:
            parts["weights"] = weights
        if sharded is not None:
            parts["sharded"] = sharded.state
        started = time.monotonic()
        copied = self._stager.stage(parts, what=repr(path))
        logger.debug("staged %d bytes of state in %.3fs", self._stager.nbytes, time.monotonic() - started)
        staged_components = [replace(c, state=state) for c, state in zip(pending, copied["components"], strict=True)]
        staged_sharded = replace(sharded, state=copied["sharded"]) if sharded is not None else None
        return _SaveState(copied.get("weights"), sharing, staged_components, staged_sharded)

    def _write_and_commit(
        self,
        world: World,
        plan: _SavePlan,
        ledger: _Ledger,
        take_state: Callable[[], _SaveState],
        started: float,
        *,
        blocked: float | None = None,
    ) -> None:
        """Steps 1-4 of the protocol: marker, every rank's files, manifest last, rotation;
        then rank 0 logs the save's one INFO line (``blocked``: how long an async save held the trainer)."""
        path = plan.path
        storage = self._checkpoint_storage(path)
        action = f"cannot save {path!r}"
        claims: list[SaveClaim] = []  # rank 0's claim on the directory, held until the commit
        on_rank0(
            world,
            lambda: claims.append(self._begin(storage, path, world, plan.target_objects)),
            action=action,
            safe=_SAVE_SAFE,
        )
        try:
            self._write_files_and_commit(world, plan, ledger, take_state, started, storage, claims, blocked=blocked)
        finally:
            for claim in claims:
                claim.release()

    def _write_files_and_commit(
        self,
        world: World,
        plan: _SavePlan,
        ledger: _Ledger,
        take_state: Callable[[], _SaveState],
        started: float,
        storage: Storage,
        claims: list[SaveClaim],
        *,
        blocked: float | None,
    ) -> None:
        path = plan.path
        action = f"cannot save {path!r}"

        def write() -> _Outcome:
            state = take_state()
            # Sharded state first, on this thread: dcp.save is a collective of every rank.
            sharded = write_sharded_state(storage, state.sharded, world) if state.sharded is not None else []

            def write_weights() -> list[FileRecord]:
                if state.weights is None:
                    return []
                if plan.weights is not None:
                    return write_weights_share(storage, plan.weights, state.weights, world.rank)
                return self._write_weights(storage, state.weights, state.sharing) if world.rank == 0 else []

            # On object stores the weights upload on a thread of their own while the components
            # upload here. Only this thread runs collectives (taking the components' state checks
            # replication), and it never waits on the weights: a failed weight upload cannot strand
            # another rank.
            weights, components = run_both(
                write_weights,
                lambda: write_component_states(storage, state.components),
                concurrently=storage.is_remote,
            )
            return _Outcome(sharded + weights, components, state.sharded.manifest_metadata() if state.sharded else None)

        outcomes = on_every_rank(world, write, action=action, safe=_SAVE_SAFE)

        def commit() -> tuple[int, list[str]]:
            written = [c for o in outcomes for c in o.components]
            files = [r for o in outcomes for r in o.weights] + [c.record for c in written]
            if plan.weights is not None:  # every rank's shards are written: the index may name them now
                files.append(publish_weights_index(storage, plan.weights, files))
            if ledger.metrics:
                files.append(self._write_metrics(storage, ledger.metrics))
            manifest = CheckpointManifest(
                checkpoint_path=self._relative(path),
                world_size=world.world_size,
                timestamp=utc_timestamp(),
                components=manifest_entries(written),
                format_version=FORMAT_VERSION,
                checkpoint_id=parse_checkpoint_id(location_name(path)),
                library_version=__version__,
                torch_version=torch.__version__,
                best_checkpoints=[e.to_json() for e in ledger.best_checkpoints],
                files=sorted(files, key=lambda r: r.path),
                metadata=self._manifest_metadata(ledger, outcomes[0]),
            )
            commit_checkpoint(storage, manifest, claims[0])
            rotated = self._rotate(path, manifest, plan.entries, ledger.preserved)
            return sum(r.size for r in files), rotated

        total, rotated = on_rank0(world, commit, action=action, safe=_SAVE_SAFE)
        world.barrier()
        summary = f"saved {location_name(path)} to {path}: {rate_summary(total, time.monotonic() - started)}"
        if blocked is not None:
            summary += f", in the background after {blocked:.2f} s of staging"
        if rotated:
            summary += f"; rotated out {', '.join(rotated)}"
        logger.log(logging.INFO if world.rank == 0 else logging.DEBUG, "%s", summary)

    def _manifest_metadata(self, ledger: _Ledger, outcome: _Outcome) -> dict[str, Any]:
        metadata: dict[str, Any] = {_BEST_MARK: ledger.best_checkpoint} if ledger.best_checkpoint else {}
        if outcome.sharded is not None:
            metadata[SHARDED_STATE_KEY] = outcome.sharded
        return metadata

    def _plan_save(self, checkpoint_path: str | None, checkpoint_id: int | str | None, world: World) -> _SavePlan:
        """Where the save goes, (when rotation follows) the run's checkpoints: one listing,
        and (with several ranks) which rank writes which weight shard.

        Rotation needs every checkpoint's status (manifests are read once per
        process, and rotation bounds how many there are); the next number alone
        needs only the folder names.
        """
        scan = scan_checkpoints(self.storage) if self.config.save_total_limit is not None else None
        target_objects: tuple[ObjectInfo, ...] | None = None
        if checkpoint_path is not None:
            path = checkpoint_path
        else:
            if checkpoint_id is not None:
                number: int | str = checkpoint_id
            elif scan is not None:
                number = scan.next_checkpoint_id()
            else:
                ids = [parse_checkpoint_id(name) for name in self.storage.list(CHECKPOINTS_DIR)]
                number = max((i for i in ids if i is not None), default=0) + 1
                target_objects = ()  # numbered past every folder listed: a new, empty one
            path = self.storage.url_of(checkpoint_key(number))
        if scan is not None and self._is_run_checkpoint(path):
            known = {e.name: e.objects for e in scan.entries}
            target_objects = known.get(location_name(path), ())
        model = self._unwrapped_model()
        weights = plan_for_world(
            None if is_sharded_model(model) else model,
            world.world_size,
            safetensors=self.config.save_safetensors,
            max_shard_size=self.config.max_shard_size,
        )
        entries = scan.entries if scan is not None else None
        return _SavePlan(path=path, entries=entries, target_objects=target_objects, weights=weights)

    def _begin(
        self, storage: Storage, path: str, world: World, objects: tuple[ObjectInfo, ...] | None
    ) -> SaveClaim:
        """Claim the target: refuse a complete checkpoint or a live save there, clear a dead save's leftovers."""
        inspection = inspect_checkpoint(storage, objects=objects)
        status = inspection.status
        if status is CheckpointStatus.COMPLETE:
            raise CheckpointExistsError(
                f"cannot save to {path!r}: a complete checkpoint is already there; it is left untouched"
            )
        if IN_PROGRESS_NAME in inspection.objects:
            refuse_if_claimed(storage)
        if status is CheckpointStatus.INCOMPLETE:
            logger.warning("removing incomplete leftovers of an interrupted save at %s", path)
            storage.delete_prefix("")
        elif inspection.keys:
            raise CheckpointExistsError(
                f"cannot save to {path!r}: it holds files that are not a ckptio checkpoint; "
                "they are left untouched; choose an empty location"
            )
        name = location_name(path)
        number = parse_checkpoint_id(name)
        claim = begin_checkpoint(storage, checkpoint_id=name if number is None else number, world_size=world.world_size)
        return claim.keep_alive()

    def _write_weights(
        self, storage: Storage, weights: Mapping[str, torch.Tensor], sharing: list[list[str]] | None
    ) -> list[FileRecord]:
        return write_model_weights(
            storage,
            weights,
            safetensors=self.config.save_safetensors,
            max_shard_size=self.config.max_shard_size,
            param_sharing_metadata=sharing,
        )

    def _write_metrics(self, storage: Storage, metrics: dict[str, float]) -> FileRecord:
        data = encode_metrics(metrics, url=storage.url_of(METRICS_NAME))
        storage.write_bytes(METRICS_NAME, data)
        return FileRecord(METRICS_NAME, len(data), checksum_bytes(data))

    def _relative(self, path: str) -> str:
        key = self._key_below_output(path)
        return key if key is not None else location_name(path)

    def _preserved(self) -> set[str]:
        preserved = {e.name for e in self.best_checkpoints[: self.config.preserve_n_best]}
        if self.best_checkpoint:
            preserved.add(self.best_checkpoint)
        return preserved

    def _rotate(
        self,
        committed_path: str,
        manifest: CheckpointManifest,
        entries: list[CheckpointEntry] | None,
        preserved: set[str],
    ) -> list[str]:
        """Rotate with the listing made before the save, plus the checkpoint just committed.

        Returns:
            The names of the checkpoints deleted.
        """
        limit = self.config.save_total_limit
        if limit is None or entries is None or not self._is_run_checkpoint(committed_path):
            return []
        name = location_name(committed_path)
        committed = CheckpointEntry(
            name=name,
            checkpoint_id=parse_checkpoint_id(name),
            status=CheckpointStatus.COMPLETE,
            timestamp=manifest.timestamp,
            mtime=None,
            url=committed_path,
            size_bytes=manifest.total_size,
            manifest=manifest,
        )
        current = [e for e in entries if e.name != name] + [committed]
        try:
            deleted = rotate_checkpoints(self.storage, current, keep=limit, preserved=preserved)
        except StorageError as exc:  # the new checkpoint is committed; rotation retries next save
            logger.warning("checkpoint %s is committed; rotating older ones failed: %s", committed_path, exc)
            return []
        return deleted

    # -- loading -----------------------------------------------------------
    def resolve_checkpoint_path(self, checkpoint_path: str | None) -> str | None:
        """The checkpoint a load would use, or None (with a warning for an explicit path).

        ``None`` gives the newest complete checkpoint. A bare name
        (``"checkpoint-7"``) always means ``<output_dir>/checkpoints/checkpoint-7``;
        a path or URL is taken as given. An explicit checkpoint that is not a
        valid (complete) checkpoint gives None and a warning, as in the seed design.
        A pending asynchronous save is waited for first.
        """
        self._background.wait()
        if checkpoint_path is None:
            return find_latest_checkpoint(self.storage)
        path = self._locate(checkpoint_path)
        if validate_checkpoint(self._checkpoint_storage(path)):
            return path
        logger.warning("checkpoint %r (%s) is not a valid checkpoint; nothing to resolve", checkpoint_path, path)
        return None

    def _find_loadable(self, checkpoint_path: str | None) -> tuple[str, CheckpointManifest | None]:
        """Rank 0: the checkpoint to load and its manifest (checksums verified when configured)."""
        if checkpoint_path is None:
            latest = scan_latest_complete(self.storage).latest_complete
            if latest is not None:
                path, manifest = latest.url, latest.manifest
            else:
                found = find_latest_checkpoint(self.storage)
                if found is None:
                    raise CheckpointNotFoundError(
                        f"cannot load: no complete checkpoint under {self.storage.url_of(CHECKPOINTS_DIR)!r}"
                    )
                path, manifest = found, read_manifest(self._checkpoint_storage(found))
        else:
            path = self._locate(checkpoint_path)
            inspection = inspect_checkpoint(self._checkpoint_storage(path))
            if inspection.status is not CheckpointStatus.COMPLETE:
                raise IncompleteCheckpointError(
                    f"cannot load {path!r}: checkpoint is {inspection.status.name.lower()}"
                    + (f" ({'; '.join(inspection.problems[:3])})" if inspection.problems else "")
                )
            manifest = inspection.manifest
        if manifest is not None and self.config.verify_checksums_on_load:
            problems = verify_checkpoint(self._checkpoint_storage(path))
            if problems:
                raise CorruptCheckpointError(f"cannot load {path!r}: {'; '.join(problems)}")
        return path, manifest

    def load_checkpoint(self, checkpoint_path: str | None = None) -> None:
        """Restore model, every component and the best list from a complete checkpoint.

        ``None`` restores the newest complete checkpoint; a bare name means one
        under ``<output_dir>/checkpoints/``. Called by every rank: rank 0 finds
        the checkpoint and reads its manifest, and shares both. Every rank reads
        the model weights, or with ``config.load_broadcast`` only the first rank
        of each node, which broadcasts them to the rest of its node.

        Raises:
            CheckpointNotFoundError: there is no complete checkpoint to load.
            IncompleteCheckpointError: the checkpoint asked for is incomplete.
            CorruptCheckpointError: checksums (when verified) or content are wrong.
            CkptioError: a pending asynchronous save, waited for first, failed
                (nothing is loaded then; call again to load).
        """
        self._background.wait()
        started = time.monotonic()
        world = self._world()
        safe = "nothing was changed on storage"
        path, manifest = on_rank0(
            world, lambda: self._find_loadable(checkpoint_path), action="cannot load a checkpoint", safe=safe
        )

        def restore() -> None:
            restore_state(
                self._checkpoint_storage(path, manifest),
                manifest,
                self._unwrapped_model(),
                self._components(),
                world,
                load_broadcast=self.config.load_broadcast,
                on_world_size_change=self.config.on_world_size_change,
            )

        on_every_rank(world, restore, action=f"cannot load {path!r}", safe=safe)
        if manifest is not None:
            self.best_checkpoints = [BestEntry.from_json(e) for e in manifest.best_checkpoints]
            self.best_checkpoint = manifest.metadata.get(_BEST_MARK)
        self.loaded_manifest = manifest
        size = manifest.total_size if manifest is not None else 0
        logger.log(
            logging.INFO if world.rank == 0 else logging.DEBUG,
            "restored %s from %s: %s",
            location_name(path),
            path,
            rate_summary(size, time.monotonic() - started),
        )

    # -- best checkpoints and final model -----------------------------------
    def update_best_checkpoints(
        self,
        checkpoint_path: str,
        metrics: dict[str, float],
        metric_key: str = "loss",
        greater_is_better: bool | None = None,
    ) -> bool:
        """Record ``metrics`` for a checkpoint and track it if it is among the best.

        Writes ``eval_metrics.json`` into the checkpoint (rank 0). The best list
        is stored in every later manifest, so it survives a resume, and rotation
        never deletes the ``preserve_n_best`` best checkpoints. Waits for a
        pending asynchronous save first (pass ``metrics=`` to ``save_checkpoint``
        to record them without waiting).

        Returns:
            Whether the checkpoint is now among the best.
        """
        self._background.wait()
        if metric_key not in metrics:
            raise InvalidArgumentError(f"metrics for {checkpoint_path!r} have no {metric_key!r}: {sorted(metrics)}")
        if greater_is_better is None:
            greater_is_better = infer_greater_is_better(metric_key)
        name = location_name(checkpoint_path)
        candidate = BestEntry(name, metric_key, float(metrics[metric_key]), greater_is_better)
        self.best_checkpoints, is_best = rank_best(
            self.best_checkpoints, candidate, max(self.config.preserve_n_best, 1)
        )
        world = self._world()
        path = self._locate(checkpoint_path)
        on_rank0(
            world,
            lambda: save_checkpoint_metrics(self._checkpoint_storage(path), metrics),
            action=f"cannot record metrics for {path!r}",
            safe="the checkpoint itself is unchanged",
        )
        return is_best

    def set_best_checkpoint(self, best_checkpoint: str) -> None:
        """Mark a checkpoint (name or path) as the best one; rotation will not delete it.

        Persisted in the manifest of every later save, so it survives a resume.
        """
        self.best_checkpoint = location_name(best_checkpoint)

    def save_model(self, output_dir: str | None = None, overwrite_output_dir: bool = False) -> None:
        """Write a final Hugging Face-style model directory (weights, and ``config.json``
        when the model has a ``save_pretrained``-style config) that ``from_pretrained`` opens.

        Called by every rank, after a pending asynchronous save has finished;
        written by rank 0. A sharded (DTensor) model is gathered one tensor at
        a time and streamed out, so no rank holds it whole. Refuses to replace
        existing weights unless ``overwrite_output_dir``.
        """
        self._background.wait()
        model = self._unwrapped_model()
        if model is None:
            raise InvalidArgumentError("save_model needs a model; the manager was created without one")
        target = output_dir or self.config.output_dir
        world = self._world()
        if is_sharded_model(model):  # no rank holds it whole: every rank gathers each tensor, rank 0 writes
            save_sharded_model(
                self._checkpoint_storage(target),
                model,
                world,
                max_shard_size=self.config.max_shard_size,
                overwrite=overwrite_output_dir,
            )
            return
        on_rank0(
            world,
            action=f"cannot save the model to {target!r}",
            safe="checkpoints are untouched",
            fn=lambda: save_model_directory(
                self._checkpoint_storage(target),
                model,
                safetensors=self.config.save_safetensors,
                max_shard_size=self.config.max_shard_size,
                overwrite=overwrite_output_dir,
            ),
        )
        world.barrier()
