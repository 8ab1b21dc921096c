"""The checkpoint manager: save and restore *all* trainer state, on any storage.

A save runs the commit protocol of :mod:`ckptio.checkpoint.commit` across
every rank:

1. global rank 0 writes the in-progress marker into
   ``<output_dir>/checkpoints/checkpoint-<id>/``; every rank waits for it;
2. rank 0 writes the model weights (Hugging Face shards, index last) and
   every rank writes the components its sharing pattern assigns to it;
3. the ranks exchange the records (size, CRC32C) of what they wrote; rank 0
   writes ``checkpoint_manifest.json`` last: that object is the commit;
4. only then are older checkpoints rotated out.

A crash anywhere before step 3 leaves a directory that discovery treats as
incomplete, so ``load_checkpoint(None)`` resumes from the previous complete
checkpoint. Nothing is ever renamed, so the protocol is the same on local disk
and on object stores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ckptio._version import __version__
from ckptio.checkpoint import (
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    METRICS_NAME,
    CheckpointManifest,
    CheckpointStatus,
    begin_checkpoint,
    checkpoint_dir_name,
    checkpoint_status,
    commit_checkpoint,
    encode_metrics,
    find_latest_checkpoint,
    list_checkpoints,
    location_name,
    maybe_delete_oldest_checkpoint,
    parse_checkpoint_id,
    read_manifest,
    save_checkpoint_metrics,
    utc_timestamp,
    verify_checkpoint,
)
from ckptio.checkpoint.best import BestEntry, infer_greater_is_better, rank_best
from ckptio.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    StorageError,
)
from ckptio.format import read_model_weights, write_model_weights
from ckptio.manager.components import (
    ComponentFile,
    load_components,
    manifest_entries,
    save_components,
)
from ckptio.manager.config import CheckpointConfig
from ckptio.manager.model_dir import save_model_directory
from ckptio.state import StateComponent, StatefulProvider, World, process_groups_of
from ckptio.storage import Storage, open_storage
from ckptio.storage.integrity import FileRecord, checksum_bytes

__all__ = ["CheckpointManager"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Manifest metadata key of the checkpoint marked with :meth:`CheckpointManager.set_best_checkpoint`.
_BEST_MARK = "best_checkpoint"


@dataclass
class _Outcome:
    """What one rank reports after writing: its files, or why it failed."""

    weights: list[FileRecord] = field(default_factory=list)
    components: list[ComponentFile] = field(default_factory=list)
    error: str | None = None


class CheckpointManager:
    """Saves and restores model, optimizer, scheduler, data position, RNG and progress.

    Every rank of a job constructs one and calls :meth:`save_checkpoint` /
    :meth:`load_checkpoint` together; a single process is a world of one.
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
        self.storage: Storage = storage or open_storage(config.output_dir, **(config.storage_options or {}))
        self.best_checkpoints: list[BestEntry] = []
        self.best_checkpoint: str | None = None
        self.loaded_manifest: CheckpointManifest | None = None

    # -- helpers -----------------------------------------------------------
    def _world(self) -> World:
        return World.current(process_groups_of(self.provider))

    def _components(self) -> list[StateComponent]:
        return list(self.provider.get_state_components()) if self.provider is not None else []

    def _unwrapped_model(self) -> torch.nn.Module | None:
        model = self.model
        return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def _on_rank0(self, world: World, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 and share its result; if it raised, every rank raises."""
        outcome: tuple[Any, str | None] = (None, None)
        if world.rank == 0:
            try:
                outcome = (fn(), None)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                if world.world_size == 1:
                    raise
                outcome = (None, f"{type(exc).__name__}: {exc}")
        result, error = world.broadcast_object(outcome, src=0) if world.world_size > 1 else outcome
        if error is not None:
            raise CheckpointError(f"rank 0 failed: {error}")
        return result  # type: ignore[no-any-return]

    def _key_below_output(self, path: str) -> str | None:
        """``path`` relative to the output dir, or None when it lies elsewhere."""
        root = self.storage.url.rstrip("/") + "/"
        return path[len(root) :] if path.startswith(root) else None

    def _checkpoint_storage(self, path: str) -> Storage:
        """The storage of a checkpoint: below the output dir when it is there, else opened anew."""
        key = self._key_below_output(path)
        if key is not None:
            return self.storage.child(key)
        return open_storage(path, **(self.config.storage_options or {}))

    def _next_checkpoint_id(self) -> int:
        ids = [e.checkpoint_id for e in list_checkpoints(self.storage) if e.checkpoint_id is not None]
        return max(ids, default=0) + 1

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
        """
        started = time.monotonic()
        world = self._world()
        path = str(self._on_rank0(world, lambda: self._save_target(checkpoint_path, checkpoint_id)))
        storage = self._checkpoint_storage(path)
        self._on_rank0(world, lambda: self._begin(storage, path, world))
        world.barrier()

        outcome = _Outcome()
        try:
            if world.rank == 0:
                outcome.weights = self._write_weights(storage)
            outcome.components = save_components(storage, self._components(), world)
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised
            if world.world_size == 1:
                raise
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcomes = world.all_gather_object(outcome)
        failures: dict[str, list[int]] = {}
        for rank, o in enumerate(outcomes):
            if o.error:
                failures.setdefault(o.error, []).append(rank)
        if failures:
            reasons = "; ".join(f"ranks {ranks}: {error}" for error, ranks in failures.items())
            raise CheckpointError(f"cannot save {path!r}: {reasons}; earlier checkpoints are intact")

        def commit() -> int:
            written = [c for o in outcomes for c in o.components]
            files = [r for o in outcomes for r in o.weights] + [c.record for c in written]
            if metrics:
                files.append(self._write_metrics(storage, metrics))
            manifest = CheckpointManifest(
                checkpoint_path=self._relative(path),
                world_size=world.world_size,
                timestamp=utc_timestamp(),
                components=manifest_entries(written),
                format_version=FORMAT_VERSION,
                checkpoint_id=parse_checkpoint_id(location_name(path)),
                library_version=__version__,
                torch_version=torch.__version__,
                best_checkpoints=[e.to_json() for e in self.best_checkpoints],
                files=sorted(files, key=lambda r: r.path),
                metadata={_BEST_MARK: self.best_checkpoint} if self.best_checkpoint else {},
            )
            commit_checkpoint(storage, manifest)
            self._rotate(path)
            return sum(r.size for r in files)

        total = self._on_rank0(world, commit)
        world.barrier()
        logger.info("saved checkpoint %s (%s bytes) in %.2fs", path, total, time.monotonic() - started)
        return path

    def _save_target(self, checkpoint_path: str | None, checkpoint_id: int | str | None) -> str:
        if checkpoint_path is not None:
            return checkpoint_path
        number = checkpoint_id if checkpoint_id is not None else self._next_checkpoint_id()
        return self.storage.url_of(f"{CHECKPOINTS_DIR}/{checkpoint_dir_name(number)}")

    def _begin(self, storage: Storage, path: str, world: World) -> None:
        status = checkpoint_status(storage)
        if status is CheckpointStatus.COMPLETE:
            raise CheckpointExistsError(
                f"cannot save to {path!r}: a complete checkpoint is already there; it is left untouched"
            )
        if status is CheckpointStatus.INCOMPLETE:
            logger.warning("removing incomplete leftovers of an interrupted save at %s", path)
            storage.delete_prefix("")
        elif storage.walk():
            raise CheckpointExistsError(
                f"cannot save to {path!r}: it holds files that are not a ckptio checkpoint; "
                "they are left untouched; choose an empty location"
            )
        name = location_name(path)
        number = parse_checkpoint_id(name)
        begin_checkpoint(storage, checkpoint_id=name if number is None else number, world_size=world.world_size)

    def _write_weights(self, storage: Storage) -> list[FileRecord]:
        model = self._unwrapped_model()
        if model is None:
            return []
        return write_model_weights(
            storage, model, safetensors=self.config.save_safetensors, max_shard_size=self.config.max_shard_size
        )

    def _write_metrics(self, storage: Storage, metrics: dict[str, float]) -> FileRecord:
        data = encode_metrics(metrics, url=storage.url_of(METRICS_NAME))
        storage.write_bytes(METRICS_NAME, data)
        return FileRecord(METRICS_NAME, len(data), checksum_bytes(data))

    def _relative(self, path: str) -> str:
        key = self._key_below_output(path)
        return key if key is not None else location_name(path)

    def _rotate(self, committed_path: str) -> None:
        limit = self.config.save_total_limit
        if limit is None or not committed_path.startswith(self.storage.url_of(CHECKPOINTS_DIR)):
            return
        preserved = [e.name for e in self.best_checkpoints[: self.config.preserve_n_best]]
        if self.best_checkpoint:
            preserved.append(self.best_checkpoint)
        try:
            deleted = maybe_delete_oldest_checkpoint(self.storage, limit, preserved)
        except StorageError as exc:  # the new checkpoint is committed; rotation retries next save
            logger.warning("checkpoint %s is committed; rotating older ones failed: %s", committed_path, exc)
            return
        if deleted:
            logger.info("rotated out %s", ", ".join(deleted))

    # -- loading -----------------------------------------------------------
    def resolve_checkpoint_path(self, checkpoint_path: str | None) -> str | None:
        """The checkpoint a load would use: the latest complete one for None,
        ``<output_dir>/checkpoints/<name>`` for a bare ``checkpoint-<n>`` name,
        else the path or URL as given. None when there is nothing to load."""
        if checkpoint_path is None:
            return find_latest_checkpoint(self.storage)
        if "/" not in checkpoint_path and parse_checkpoint_id(checkpoint_path) is not None:
            return self.storage.url_of(f"{CHECKPOINTS_DIR}/{checkpoint_path}")
        return checkpoint_path

    def load_checkpoint(self, checkpoint_path: str | None = None) -> None:
        """Restore model, every component and the best list from a complete checkpoint.

        ``None`` restores the newest complete checkpoint. Called by every rank.

        Raises:
            CheckpointNotFoundError: there is no complete checkpoint to load.
            IncompleteCheckpointError: the checkpoint asked for is incomplete.
            CorruptCheckpointError: checksums (when verified) or content are wrong.
        """
        started = time.monotonic()
        path = self.resolve_checkpoint_path(checkpoint_path)
        if path is None:
            raise CheckpointNotFoundError(
                f"cannot load: no complete checkpoint under {self.storage.url_of(CHECKPOINTS_DIR)!r}"
            )
        storage = self._checkpoint_storage(path)
        status = checkpoint_status(storage)
        if status is not CheckpointStatus.COMPLETE:
            raise IncompleteCheckpointError(f"cannot load {path!r}: checkpoint is {status.name.lower()}")
        manifest = read_manifest(storage)
        if manifest is not None and self.config.verify_checksums_on_load:
            problems = verify_checkpoint(storage)
            if problems:
                raise CorruptCheckpointError(f"cannot load {path!r}: {'; '.join(problems)}")
        model = self._unwrapped_model()
        if model is not None:
            read_model_weights(storage, model, strict=True)
        if manifest is not None:
            load_components(
                storage,
                self._components(),
                self._world(),
                manifest,
                on_world_size_change=self.config.on_world_size_change,
            )
            self.best_checkpoints = [BestEntry.from_json(e) for e in manifest.best_checkpoints]
            self.best_checkpoint = manifest.metadata.get(_BEST_MARK)
        self.loaded_manifest = manifest
        logger.info("restored checkpoint %s in %.2fs", path, time.monotonic() - started)

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
        never deletes the ``preserve_n_best`` best checkpoints.

        Returns:
            Whether the checkpoint is now among the best.
        """
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
        self._on_rank0(world, lambda: save_checkpoint_metrics(self._checkpoint_storage(checkpoint_path), metrics))
        return is_best

    def set_best_checkpoint(self, best_checkpoint: str) -> None:
        """Mark a checkpoint (name or path) as the best one; rotation will not delete it.

        Persisted in the manifest of every later save, so it survives a resume.
        """
        self.best_checkpoint = location_name(best_checkpoint)

    def save_model(self, output_dir: str | None = None, overwrite_output_dir: bool = False) -> None:
        """Write a final Hugging Face-style model directory (weights, and ``config.json``
        when the model has a ``save_pretrained``-style config) that ``from_pretrained`` opens.

        Written by rank 0. Refuses to replace existing weights unless ``overwrite_output_dir``.
        """
        model = self._unwrapped_model()
        if model is None:
            raise InvalidArgumentError("save_model needs a model; the manager was created without one")
        target = output_dir or self.config.output_dir
        world = self._world()
        self._on_rank0(
            world,
            lambda: save_model_directory(
                self._checkpoint_storage(target),
                model,
                safetensors=self.config.save_safetensors,
                max_shard_size=self.config.max_shard_size,
                overwrite=overwrite_output_dir,
            ),
        )
        world.barrier()
