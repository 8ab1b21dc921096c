"""Saving and restoring a provider's state components across ranks.

Each rank walks the same component list in the same order (the replication
check is a collective), writes the files its sharing pattern assigns to it and
reports a :class:`ComponentFile` per file; rank 0 folds every rank's reports
into the manifest's component entries. On load each rank reads back the file
its pattern names for it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptio.checkpoint import CheckpointManifest, ComponentManifest
from ckptio.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MissingComponentWarning,
)
from ckptio.state import (
    ComponentPlacement,
    SharingPattern,
    StateComponent,
    World,
    check_replicated,
    file_for_load,
    load_component_state,
    placement_for_save,
    save_component_state,
)
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord, checksum_bytes
from ckptio.storage.transfer import map_concurrently

__all__ = [
    "ComponentFile",
    "MissingComponentWarning",
    "PendingComponent",
    "load_components",
    "manifest_entries",
    "save_components",
    "take_component_states",
    "write_component_states",
]

logger = logging.getLogger(__name__)

#: Component files one rank uploads at once to an object store (local disk: one at a time).
_WRITE_WORKERS = 4


@dataclass(frozen=True)
class ComponentFile:
    """One component file written by one rank."""

    key: str
    sharing_pattern: str
    writer_rank: int
    shared_by: tuple[int, ...]
    record: FileRecord
    group_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _group_ranks(component: StateComponent, world: World) -> list[int] | None:
    if component.sharing_pattern is not SharingPattern.PER_GROUP or world.world_size == 1:
        return None
    return world.group_ranks(component.process_group_name)


@dataclass(frozen=True)
class PendingComponent:
    """A component's state as taken for a save, and where this rank writes it."""

    component: StateComponent
    placement: ComponentPlacement
    state: Any


def take_component_states(components: Sequence[StateComponent], world: World) -> list[PendingComponent]:
    """Take every component's state and check replication; call on every rank, same list, same order.

    Every component's state is taken (and replication checked, a collective)
    in list order, before anything is written, so a rank whose write fails
    never leaves the others waiting in a check.

    Returns:
        The components this rank writes, with their states (references to the
        live state: stage them before the trainer changes it).

    Raises:
        ReplicationMismatchError: a REPLICATED component with ``validate_replication``
            differs between ranks (raised on every rank, before anything of it is written).
    """
    pending: list[PendingComponent] = []
    for component in components:
        state = component.stateful.state_dict()
        if component.validate_replication:
            check_replicated(state, world, key=component.key, level=component.validation_level)
        placement = placement_for_save(
            component.sharing_pattern,
            component.key,
            world,
            group_name=component.process_group_name,
            group_ranks=_group_ranks(component, world),
        )
        if placement.writes:
            pending.append(PendingComponent(component, placement, state))
    return pending


def write_component_states(storage: Storage, pending: Sequence[PendingComponent]) -> list[ComponentFile]:
    """Write this rank's component files, several at once where the storage is remote
    (:meth:`~ckptio.storage.Storage.concurrency`). No collectives.

    Results are in list order whatever order the uploads finish in.
    """

    def write(item: PendingComponent) -> ComponentFile:
        component, placement = item.component, item.placement
        return ComponentFile(
            key=component.key,
            sharing_pattern=SharingPattern(component.sharing_pattern).value,
            writer_rank=placement.writer_rank,
            shared_by=tuple(placement.shared_by),
            record=save_component_state(storage, placement.file_name, item.state),
            group_name=component.process_group_name,
            metadata=dict(component.metadata),
        )

    workers = storage.concurrency(_WRITE_WORKERS)
    return map_concurrently(write, list(pending), workers=workers, thread_name="ckptio-component")


def save_components(storage: Storage, components: Sequence[StateComponent], world: World) -> list[ComponentFile]:
    """Take (:func:`take_component_states`) and write (:func:`write_component_states`)
    this rank's share of every component; call on every rank, same list, same order."""
    return write_component_states(storage, take_component_states(components, world))


def manifest_entries(files: Sequence[ComponentFile]) -> dict[str, ComponentManifest]:
    """Fold every rank's component files into one manifest entry per component key."""
    by_key: dict[str, list[ComponentFile]] = {}
    for item in files:
        by_key.setdefault(item.key, []).append(item)
    entries: dict[str, ComponentManifest] = {}
    for key, items in by_key.items():
        items.sort(key=lambda i: i.record.path)
        first = items[0]
        replicated = first.sharing_pattern == SharingPattern.REPLICATED.value
        checksum = items[0].record.crc32c if len(items) == 1 else checksum_bytes(
            "".join(i.record.crc32c for i in items).encode()
        )
        entries[key] = ComponentManifest(
            key=key,
            sharing_pattern=first.sharing_pattern,
            ranks=sorted({i.writer_rank for i in items}),
            replicated_across=sorted(first.shared_by) if replicated else None,
            group_name=first.group_name,
            size_bytes=sum(i.record.size for i in items),
            checksum=checksum,
            metadata=first.metadata,
            files=[i.record.path for i in items],
        )
    return entries


def _skip(component: StateComponent, message: str, cause: BaseException | None = None) -> None:
    if component.required:
        raise IncompleteCheckpointError(message) from cause
    warnings.warn(f"{message}; optional component {component.key!r} keeps its current state",
                  MissingComponentWarning, stacklevel=3)


def load_components(
    storage: Storage,
    components: Sequence[StateComponent],
    world: World,
    manifest: CheckpointManifest,
    *,
    on_world_size_change: str = "error",
) -> None:
    """Restore every component from the files its pattern names for this rank.

    A missing or unreadable *required* component raises; an optional one warns
    (:class:`MissingComponentWarning`) and keeps its current state.

    Raises:
        IncompleteCheckpointError: a required component is absent or its file is missing.
        CorruptCheckpointError: a required component's file cannot be unpickled safely.
        WorldSizeMismatchError: per-rank state from another world size (see
            ``on_world_size_change``).
    """
    saved = manifest.components
    sizes = {record.path: record.size for record in manifest.files}  # big files fetched in concurrent ranges
    for component in components:
        entry = saved.get(component.key)
        if entry is None:
            _skip(component, f"checkpoint {storage.url!r} has no component {component.key!r} "
                             f"(it holds {sorted(saved)})")
            continue
        pattern = SharingPattern(component.sharing_pattern)
        file_name = file_for_load(
            pattern,
            component.key,
            world,
            saved_world_size=manifest.world_size,
            saved_num_nodes=len(entry.files) if pattern is SharingPattern.PER_NODE else None,
            group_name=component.process_group_name,
            group_ranks=_group_ranks(component, world),
            on_world_size_change=on_world_size_change,
            checkpoint_url=storage.url,
        )
        if file_name is None:
            logger.warning("not restoring %r: saved at another world size (on_world_size_change='skip')",
                           component.key)
            continue
        try:
            state = load_component_state(storage, file_name, size=sizes.get(file_name))
        except (FileNotFoundError, CorruptCheckpointError) as exc:
            if component.required and isinstance(exc, CorruptCheckpointError):
                raise
            _skip(component, f"cannot restore component {component.key!r} from {storage.url_of(file_name)!r}: {exc}",
                  exc)
            continue
        component.stateful.load_state_dict(state)
        logger.debug("restored component %r from %s", component.key, storage.url_of(file_name))
