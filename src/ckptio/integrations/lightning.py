"""Lightning checkpoints saved, loaded and removed on any storage with ckptio's commit and checksums.

::

    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from ckptio.integrations.lightning import CkptioCheckpointIO, latest_checkpoint

    trainer = Trainer(plugins=[CkptioCheckpointIO()],
                      callbacks=[ModelCheckpoint(dirpath="s3://bucket/run", save_top_k=2, monitor="val_loss")])
    trainer.fit(model, ckpt_path=latest_checkpoint("s3://bucket/run"))  # None on a fresh run

Layout: every checkpoint path Lightning asks for, ``<dirpath>/<name>.ckpt``, is a *folder*::

    <name>.ckpt/
        checkpoint_in_progress.json   written first by a fresh save, removed after the commit
        lightning_state.pt            the whole Lightning checkpoint dict, one torch.save file
        checkpoint_manifest.json      written last: size and CRC32C of the state file

The state file is written by ckptio's component writer
(:func:`~ckptio.state.component_io.save_component_state`): ``torch.save`` streamed into a
multipart upload (nothing is visible until the whole file is), checksummed on the way out, and
refused *at save* when it holds values ``torch.load(weights_only=True)`` could not rebuild (a
hyper-parameter of an arbitrary class: register it with ``torch.serialization.add_safe_globals``
or store a plain value), so every checkpoint loads with ``weights_only=True``, whatever
``weights_only`` Lightning asks for. The manifest is a regular ckptio manifest (one ``lightning``
component), so ``ckptio verify``/``ckptio inspect`` work on the folder.

Why a folder rather than one ``<name>.ckpt`` object plus a sidecar manifest:

* The commit point must be a single atomic object. With a sidecar, the checkpoint and its
  record are two objects that are published, overwritten and deleted one after the other:
  re-saving ``last.ckpt`` (Lightning does that at every save with ``save_last=True``) replaces
  the data before the record, so a crash in between leaves the old checkpoint gone and the new
  one unverifiable; removal deletes one before the other. In a folder the manifest is that one
  object, and ckptio's protocol applies as it is (:mod:`ckptio.checkpoint.commit`): marker
  first, manifest last; removal writes the marker and deletes the manifest before anything else.
* An overwrite is crash-safe too: when the folder already holds a complete checkpoint, the new
  state goes to the *other* of two names (``lightning_state.pt`` / ``lightning_alt_state.pt``)
  and the manifest is then replaced atomically, so until that instant the previous checkpoint
  is intact and loads; the superseded file is deleted afterwards. An interrupted overwrite
  leaves the previous checkpoint loadable, as Lightning's own atomic save does.
* Lightning already knows ``.ckpt`` folders (its sharded FSDP and DeepSpeed checkpoints):
  ``ModelCheckpoint`` checks ``fs.exists`` for version suffixes, lists ``*.ckpt`` for
  ``ckpt_path="last"`` and takes ``fs.modified``; all of these answer the same for a folder.

The price: a plain ``torch.load("<name>.ckpt")`` does not open it; load it through this plugin
(or ``torch.load("<name>.ckpt/<state file named in the manifest>", weights_only=True)``).

Loading reads the manifest, checks every listed file's size against one listing, reads the
state file once and checks its CRC32C on the bytes read (on local disk the file is mapped and
checksummed from the page cache), then ``torch.load(weights_only=True)``. It writes nothing. A
folder without a manifest (a save that never committed, a removal that started) is an
:class:`~ckptio.errors.IncompleteCheckpointError`; a size or checksum mismatch a
:class:`~ckptio.errors.CorruptCheckpointError`; nothing there a
:class:`~ckptio.errors.CheckpointNotFoundError`; every message names the URL.

What Lightning itself does on remote ``dirpath`` (outside this plugin's reach):

* ``ModelCheckpoint`` opens its own fsspec filesystem on ``dirpath`` *without* any
  ``storage_options`` (to check whether a name is taken and to list ``last*.ckpt``): the
  credentials and endpoint must also reach fsspec another way (environment variables such as
  ``AWS_*``, or ``fsspec.config.conf["s3"] = {...}``), as with Lightning's own ``CheckpointIO``.
* ``ckpt_path="last"`` finds nothing on S3 or GCS with any ``CheckpointIO`` (Lightning
  normalizes the listed keys with ``os.path.normpath``, which drops the protocol) and training
  silently starts over after a warning. Pass ``ckpt_path=latest_checkpoint(dirpath)`` instead;
  on local disk ``"last"`` works.

Needs ``pip install 'ckptio[lightning]'``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import pickle
from collections.abc import Callable
from typing import IO, Any, cast

import torch

from ckptio.checkpoint import (
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    CheckpointInspection,
    CheckpointManifest,
    CheckpointStatus,
    ComponentManifest,
    begin_checkpoint,
    commit_checkpoint,
    delete_checkpoint,
    inspect_checkpoint,
    is_checkpoint_file,
    join_location,
    parse_timestamp,
    utc_timestamp,
    write_manifest,
)
from ckptio.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    MissingDependencyError,
    ObjectNotFoundError,
)
from ckptio.format.ranged_reads import read_object
from ckptio.state.component_io import load_component_state, save_component_state
from ckptio.storage import ObjectInfo, Storage, open_storage
from ckptio.storage.integrity import checksum_bytes, checksum_object
from ckptio.storage.view_file import ViewFile

try:
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        f"ckptio.integrations.lightning needs Lightning: {_exc}; pip install 'ckptio[lightning]'"
    ) from _exc

__all__ = ["COMPONENT_KEY", "STATE_FILES", "CkptioCheckpointIO", "latest_checkpoint"]

logger = logging.getLogger(__name__)

#: The manifest's component holding the Lightning checkpoint dict.
COMPONENT_KEY = "lightning"
#: The two names the state file alternates between when a checkpoint is overwritten.
STATE_FILES = ("lightning_state.pt", "lightning_alt_state.pt")
_WRITER = "ckptio.integrations.lightning.CkptioCheckpointIO"

StorageWrapperFactory = Callable[[Storage], Storage]


def _split(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(parent, name)`` of a checkpoint path or URL."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" not in text:
        text = os.path.abspath(os.path.expanduser(text))
        return os.path.dirname(text), os.path.basename(text)
    parent, _, name = text.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/"):
        raise InvalidArgumentError(f"checkpoint path {text!r} must name a folder below a bucket or directory")
    return parent, name


def _inspect(folder: Storage, objects: list[ObjectInfo]) -> CheckpointInspection | None:
    """The folder's inspection, or None when its manifest is malformed (logged)."""
    try:
        return inspect_checkpoint(folder, objects=objects)
    except CorruptCheckpointError as exc:
        logger.warning("%s is not a usable checkpoint: %s", folder.url, exc)
        return None


def _state_record(folder: Storage, inspection: CheckpointInspection | None) -> tuple[CheckpointManifest, str] | None:
    """``(manifest, state file)`` of a complete checkpoint written by this plugin, else None."""
    if inspection is None or inspection.status is not CheckpointStatus.COMPLETE or inspection.manifest is None:
        return None
    component = inspection.manifest.components.get(COMPONENT_KEY)
    if component is None or len(component.files) != 1 or component.files[0] not in STATE_FILES:
        logger.debug("%s holds a ckptio checkpoint that is not a Lightning one", folder.url)
        return None
    return inspection.manifest, component.files[0]


def _options(value: object) -> dict[str, Any]:
    """A copy of fsspec ``storage_options`` (None is none)."""
    if value is not None and not isinstance(value, dict):
        raise InvalidArgumentError(f"storage_options must be a dict or None, got {value!r}")
    return dict(value or {})


def _json_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class CkptioCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that commits every checkpoint the ckptio way, on any storage.

    Args:
        storage_options: fsspec options for the backend (credentials, ``endpoint_url``), used
            for every path; ``Trainer.save_checkpoint(..., storage_options=...)`` adds to them
            for one save.
        verify_checksums: check the state file's CRC32C on load (on the bytes read, so it
            costs no extra request); sizes are always checked.
        storage_wrapper: wraps the storage of every operation (for instance in a
            :class:`~ckptio.storage.FaultInjectingStorage`, for crash tests).
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        *,
        verify_checksums: bool = True,
        storage_wrapper: StorageWrapperFactory | None = None,
    ) -> None:
        super().__init__()
        self._storage_options = _options(storage_options)
        self.verify_checksums = verify_checksums
        self._storage_wrapper = storage_wrapper

    @property
    def storage_options(self) -> dict[str, Any]:
        """A copy of the fsspec options every operation uses."""
        return dict(self._storage_options)

    def _open(self, path: str | os.PathLike[str], extra: Any = None) -> tuple[Storage, Storage, str]:
        """``(parent storage, checkpoint folder storage, folder name)`` of ``path``."""
        parent_url, name = _split(path)
        parent = open_storage(parent_url, **{**self._storage_options, **_options(extra)})
        if self._storage_wrapper is not None:
            parent = self._storage_wrapper(parent)
        return parent, parent.child(name), name

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to the folder ``path`` and commit it (manifest last).

        A complete checkpoint already at ``path`` stays intact and loadable until the new one
        is committed; anything else there from this plugin (an interrupted save or removal) is
        replaced.

        Raises:
            InvalidArgumentError: the checkpoint holds values ``torch.load(weights_only=True)``
                would refuse (named by path); nothing was written.
            CheckpointExistsError: a plain file (another ``CheckpointIO``'s checkpoint) is at
                ``path``; it is left as it is.
            StorageError: the backend failed; the checkpoint at ``path`` is not committed (a
                previous complete one there still loads).
        """
        if not isinstance(checkpoint, dict):
            raise InvalidArgumentError(f"a Lightning checkpoint is a dict, got {type(checkpoint).__name__}")
        parent, folder, name = self._open(path, storage_options)
        objects = folder.list_objects("")
        if not objects and parent.is_file(name):
            raise CheckpointExistsError(
                f"cannot save {folder.url!r}: a single file is there (a checkpoint written by another "
                "CheckpointIO); it is left as it is: remove it or save under another name"
            )
        current = _state_record(folder, _inspect(folder, objects))
        claim = begin_checkpoint(folder, checkpoint_id=name, world_size=1) if current is None else None
        try:  # a claim is held from the marker to the commit, even if this process dies in between
            if current is None:
                # A manifest of an incomplete checkpoint must go before a new file could match it.
                folder.delete(MANIFEST_NAME, missing_ok=True)
            state_file = STATE_FILES[1] if current is not None and current[1] == STATE_FILES[0] else STATE_FILES[0]
            try:
                record = save_component_state(folder, state_file, checkpoint)
            except InvalidArgumentError:  # refused before writing: leave the path as it was
                if not objects:
                    folder.delete_prefix("")
                raise
            manifest = CheckpointManifest(
                checkpoint_path=".",
                world_size=1,
                timestamp=utc_timestamp(),
                components={
                    COMPONENT_KEY: ComponentManifest(
                        key=COMPONENT_KEY,
                        sharing_pattern="global",
                        ranks=[0],
                        size_bytes=record.size,
                        checksum=record.crc32c,
                        files=[state_file],
                    )
                },
                checkpoint_id=name,
                files=[record],
                metadata={
                    "writer": _WRITER,
                    "global_step": _json_int(checkpoint.get("global_step")),
                    "epoch": _json_int(checkpoint.get("epoch")),
                    "lightning_version": str(checkpoint.get("pytorch-lightning_version", "")),
                },
            )
            if claim is not None:
                commit_checkpoint(folder, manifest, claim)
            else:
                write_manifest(folder, manifest)  # one atomic replace: the old checkpoint until now, the new one after
        finally:
            if claim is not None:
                claim.release()
        # The superseded state file, a crashed save's leftovers, a marker an interrupted removal left
        # next to the manifest (a fresh save's own marker went with its commit).
        keep = {MANIFEST_NAME, state_file} if current is not None else {MANIFEST_NAME, IN_PROGRESS_NAME, state_file}
        stale = [o.key for o in objects if o.key not in keep and is_checkpoint_file(o.key)]
        if stale:
            folder.delete_many(stale)
        logger.debug("saved Lightning checkpoint %s (%d bytes)", folder.url, record.size)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load the checkpoint committed at ``path``, verified against its manifest.

        Always loads with ``torch.load(weights_only=True)`` (saving refused anything else), so
        ``weights_only`` changes nothing. ``map_location`` defaults to the CPU. Writes nothing.

        Raises:
            CheckpointNotFoundError: nothing is at ``path`` (or only a single file, not
                written by this plugin).
            IncompleteCheckpointError: the folder has no manifest (a save that never
                committed, or a removal that started) or misses a file it lists.
            CorruptCheckpointError: a malformed manifest, a size or CRC32C mismatch, or an
                unreadable state file. Nothing is modified.
        """
        del weights_only  # always weights_only=True
        parent, folder, name = self._open(path)
        objects = folder.list_objects("")
        if not objects:
            if parent.is_file(name):
                raise CheckpointNotFoundError(
                    f"cannot load {folder.url!r}: it is a single file, not a checkpoint saved by "
                    "CkptioCheckpointIO (no manifest to verify it against); load it with Lightning's "
                    "TorchCheckpointIO"
                )
            raise CheckpointNotFoundError(f"cannot load {folder.url!r}: no checkpoint there")
        inspection = inspect_checkpoint(folder, objects=objects)
        if inspection.manifest is None:
            raise IncompleteCheckpointError(
                f"cannot load {folder.url!r}: it has no manifest, so it was never committed (a save that "
                f"did not finish, or a removal that started); nothing was changed. {'; '.join(inspection.problems)}"
            )
        if inspection.status is not CheckpointStatus.COMPLETE:
            missing = any(r.path not in inspection.objects for r in inspection.manifest.files)
            kind = IncompleteCheckpointError if missing else CorruptCheckpointError
            raise kind(f"cannot load {folder.url!r}: {'; '.join(inspection.problems)}; nothing was changed")
        found = _state_record(folder, inspection)
        if found is None:
            raise CorruptCheckpointError(
                f"cannot load {folder.url!r}: its manifest has no {COMPONENT_KEY!r} component naming one of "
                f"{list(STATE_FILES)}: it is not a checkpoint saved by CkptioCheckpointIO"
            )
        manifest, state_file = found
        record = manifest.file_record(state_file)
        if record is None:
            raise CorruptCheckpointError(
                f"cannot load {folder.url!r}: its manifest does not list {state_file!r}; nothing was changed"
            )
        state = self._read_state(folder, state_file, record.size, record.crc32c, map_location or "cpu")
        if not isinstance(state, dict):
            raise CorruptCheckpointError(
                f"cannot load {folder.url_of(state_file)!r}: it holds a {type(state).__name__}, not a checkpoint dict"
            )
        logger.debug("loaded Lightning checkpoint %s", folder.url)
        return state

    def _read_state(self, folder: Storage, key: str, size: int, crc32c: str, map_location: Any) -> Any:
        """Read the state file once, check its CRC32C on those bytes, and unpickle it (weights only)."""
        url = folder.url_of(key)
        if folder.local_path(key) is not None:  # mapped, not read: the checksum reads the page cache
            if self.verify_checksums:
                self._check_crc(url, checksum_object(folder, key).crc32c, crc32c)
            return load_component_state(folder, key, map_location=map_location, size=size)
        try:
            data = read_object(folder, key, size=size)
        except ObjectNotFoundError as exc:
            raise IncompleteCheckpointError(
                f"cannot load {url!r}: it was removed while loading (the checkpoint was overwritten or removed)"
            ) from exc
        if len(data) != size:
            raise CorruptCheckpointError(f"cannot load {url!r}: read {len(data)} bytes, manifest lists {size}")
        if self.verify_checksums:
            self._check_crc(url, checksum_bytes(data), crc32c)
        source = ViewFile(data)
        try:
            return torch.load(cast(IO[bytes], source), map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CorruptCheckpointError(
                f"refusing to load {url!r}: torch.load(weights_only=True) will not rebuild it ({exc}); "
                "nothing was executed"
            ) from exc
        except Exception as exc:
            raise CorruptCheckpointError(f"cannot load {url!r}: not a readable torch.save file ({exc})") from exc
        finally:
            source.release()

    @staticmethod
    def _check_crc(url: str, got: str, expected: str) -> None:
        if got != expected:
            raise CorruptCheckpointError(
                f"cannot load {url!r}: CRC32C is {got}, the manifest lists {expected}: the file is corrupt; "
                "nothing was changed"
            )

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint at ``path``, never leaving a half-removed one that loads.

        The marker is written and the manifest deleted before any other file, so an
        interrupted removal leaves a folder that no longer loads (a later save or removal of
        that path cleans it up). A single file at ``path`` (another ``CheckpointIO``'s
        checkpoint) is deleted; a folder holding files this plugin does not write is left
        alone with a warning. Nothing at ``path`` is not an error.
        """
        parent, folder, name = self._open(path)
        keys = folder.walk("")
        if not keys:
            if parent.is_file(name):
                parent.delete(name)
            return
        if MANIFEST_NAME not in keys and IN_PROGRESS_NAME not in keys and not all(map(is_checkpoint_file, keys)):
            logger.warning(
                "not removing %s: it holds files that CkptioCheckpointIO does not write (%s)",
                folder.url,
                ", ".join(k for k in keys if not is_checkpoint_file(k))[:200],
            )
            return
        delete_checkpoint(folder)
        logger.debug("removed Lightning checkpoint %s", folder.url)

    def latest_checkpoint(self, dirpath: str | os.PathLike[str]) -> str | None:
        """:func:`latest_checkpoint` with this plugin's storage options."""
        return latest_checkpoint(dirpath, self._storage_options)


def latest_checkpoint(dirpath: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest complete ``<dirpath>/*.ckpt`` saved by :class:`CkptioCheckpointIO`, or None.

    Ordered by manifest timestamp (when the save was committed), so an overwritten
    ``last.ckpt`` counts as new. Incomplete, corrupt and foreign folders are skipped. Costs one
    listing of ``dirpath`` and one read per manifest. For ``trainer.fit(ckpt_path=...)``,
    where ``ckpt_path="last"`` does not work on object stores.

    Returns:
        The checkpoint's path in the form ``dirpath`` was given (a URL stays a URL).
    """
    storage = open_storage(dirpath, **(storage_options or {}))
    groups: dict[str, list[ObjectInfo]] = {}
    for info in storage.list_objects(""):
        name, sep, rest = info.key.partition("/")
        if sep and rest and name.endswith(".ckpt"):
            groups.setdefault(name, []).append(dataclasses.replace(info, key=rest))
    best: tuple[_dt.datetime, str] | None = None
    for name, objects in groups.items():
        if not any(o.key == MANIFEST_NAME for o in objects):
            continue
        folder = storage.child(name)
        found = _state_record(folder, _inspect(folder, objects))
        if found is not None:
            candidate = (parse_timestamp(found[0].timestamp), name)
            best = candidate if best is None or candidate > best else best
    return join_location(dirpath, best[1]) if best is not None else None
