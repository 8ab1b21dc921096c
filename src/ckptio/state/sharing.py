"""Which file each rank writes and reads for each sharing pattern. Pure: no I/O, no collectives.

File names (inside a checkpoint directory):

=============  ==========================================  ===========================  ==========================
pattern        file                                        written by                   read by
=============  ==========================================  ===========================  ==========================
GLOBAL         ``{key}_state.pt``                          global rank 0                every rank
REPLICATED     ``{key}_state.pt``                          global rank 0 (once)         every rank
PER_RANK       ``{key}_state_rank_{r}.pt``                 every rank, its own          the same rank
PER_GROUP      ``{key}_state_group_{name}_grank_{g}.pt``   the group's lowest rank      every member of the group
PER_NODE       ``{key}_state_node_{n}.pt``                 local rank 0 of each node    every rank on that node
=============  ==========================================  ===========================  ==========================

For ``PER_GROUP``, ``name`` is the component's ``process_group_name`` and ``g``
is the lowest global rank of *this rank's* group of that name: every instance
of a group kind (each tensor-parallel group is called ``"tp"``) gets its own
file, identified by a rank that stays the same as long as the layout does.
``n`` is the node index (nodes ordered by their lowest global rank).

Every decision here is a function of the rank's own facts, so no rank waits for
another: the seed design ran collectives on a subset of ranks for PER_GROUP and
PER_NODE and deadlocked with more than one rank.

World-size changes: GLOBAL and REPLICATED state reloads at any world size.
PER_RANK and PER_GROUP state saved with another world size, and PER_NODE state
saved with another node count, raise :class:`~ckptio.errors.WorldSizeMismatchError`
unless the caller opts into a fallback (``on_world_size_change``):
``"rank0"``, every rank loads the copy of rank 0 (of rank 0's group, of node 0);
``"skip"``, nothing is loaded (:func:`file_for_load` returns None) and the
component keeps its freshly initialised state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ckptio.errors import InvalidArgumentError, WorldSizeMismatchError
from ckptio.state.components import SharingPattern, validate_name_fragment

__all__ = [
    "WORLD_SIZE_POLICIES",
    "ComponentPlacement",
    "RankFacts",
    "RankInfo",
    "component_file_name",
    "file_for_load",
    "placement_for_save",
]

#: Accepted values of ``on_world_size_change``.
WORLD_SIZE_POLICIES = ("error", "rank0", "skip")


class RankFacts(Protocol):
    """What placement needs to know about a rank (:class:`~ckptio.state.World` and :class:`RankInfo` fit)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def local_rank(self) -> int: ...

    @property
    def node_rank(self) -> int: ...

    @property
    def num_nodes(self) -> int: ...

    @property
    def node_ranks(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class RankInfo:
    """Plain rank facts, for planning without a process group (tests, tools)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    num_nodes: int = 1
    node_ranks: tuple[int, ...] = (0,)

    @classmethod
    def contiguous(cls, rank: int, world_size: int, local_world_size: int | None = None) -> RankInfo:
        """Facts of ``rank`` when nodes are contiguous blocks of ``local_world_size`` ranks (torchrun's layout)."""
        per_node = local_world_size or world_size
        if per_node < 1 or world_size % per_node or not 0 <= rank < world_size:
            raise InvalidArgumentError(
                f"cannot place rank {rank} in a world of {world_size} with {per_node} ranks per node"
            )
        node = rank // per_node
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=rank % per_node,
            node_rank=node,
            num_nodes=world_size // per_node,
            node_ranks=tuple(range(node * per_node, (node + 1) * per_node)),
        )


@dataclass(frozen=True)
class ComponentPlacement:
    """Where one rank's copy of a component goes at save.

    Attributes:
        file_name: the component file (relative to the checkpoint directory)
            holding this rank's state.
        writes: whether *this* rank writes that file.
        writer_rank: the global rank that writes it.
        shared_by: the global ranks whose state that file holds (its readers).
    """

    file_name: str
    writes: bool
    writer_rank: int = 0
    shared_by: tuple[int, ...] = ()


def component_file_name(
    key: str,
    pattern: SharingPattern | str,
    *,
    rank: int | None = None,
    group_name: str | None = None,
    group_first_rank: int | None = None,
    node: int | None = None,
) -> str:
    """The file name of a component: ``{key}_state.pt``, ``..._rank_{r}``, ``..._group_{name}_grank_{g}``, ``..._node_{n}``.

    Raises:
        InvalidArgumentError: a bad key or group name, or the index the pattern needs is missing.
    """
    pattern = _pattern(pattern)
    validate_name_fragment(key, "component key")
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return f"{key}_state.pt"
    if pattern is SharingPattern.PER_RANK:
        return f"{key}_state_rank_{_index(rank, 'rank', key)}.pt"
    if pattern is SharingPattern.PER_NODE:
        return f"{key}_state_node_{_index(node, 'node', key)}.pt"
    name = validate_name_fragment(group_name, f"process_group_name of {key!r}")
    return f"{key}_state_group_{name}_grank_{_index(group_first_rank, 'group_first_rank', key)}.pt"


def placement_for_save(
    pattern: SharingPattern | str,
    key: str,
    world: RankFacts,
    *,
    group_name: str | None = None,
    group_ranks: Sequence[int] | None = None,
) -> ComponentPlacement:
    """Decide which file this rank's state belongs in and whether this rank writes it.

    Args:
        pattern: the component's sharing pattern.
        key: the component key.
        world: this rank's facts (a :class:`~ckptio.state.World`).
        group_name: the component's ``process_group_name`` (PER_GROUP).
        group_ranks: global ranks of this rank's group of that name
            (``world.group_ranks(name)``); may be omitted in a world of one.

    Raises:
        InvalidArgumentError: PER_GROUP without a name, without ``group_ranks``
            in a world of several ranks, or a group this rank is not in.
    """
    pattern = _pattern(pattern)
    everyone = tuple(range(world.world_size))
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return ComponentPlacement(component_file_name(key, pattern), world.rank == 0, 0, everyone)
    if pattern is SharingPattern.PER_RANK:
        return ComponentPlacement(
            component_file_name(key, pattern, rank=world.rank), True, world.rank, (world.rank,)
        )
    if pattern is SharingPattern.PER_NODE:
        writer = world.node_ranks[0] if world.node_ranks else world.rank
        name = component_file_name(key, pattern, node=world.node_rank)
        return ComponentPlacement(name, world.local_rank == 0, writer, tuple(world.node_ranks))
    members = _group_members(key, world, group_name, group_ranks)
    name = component_file_name(key, pattern, group_name=group_name, group_first_rank=members[0])
    return ComponentPlacement(name, world.rank == members[0], members[0], members)


def file_for_load(
    pattern: SharingPattern | str,
    key: str,
    world: RankFacts,
    *,
    saved_world_size: int,
    saved_num_nodes: int | None = None,
    group_name: str | None = None,
    group_ranks: Sequence[int] | None = None,
    on_world_size_change: str = "error",
    checkpoint_url: str | None = None,
) -> str | None:
    """The file this rank restores a component from, or None when the ``"skip"`` fallback applies.

    Args:
        pattern, key, world, group_name, group_ranks: as for :func:`placement_for_save`.
        saved_world_size: world size recorded in the checkpoint's manifest.
        saved_num_nodes: node count at save (PER_NODE; the number of node
            files the manifest lists). None skips the node-count check.
        on_world_size_change: ``"error"``, ``"rank0"`` or ``"skip"`` (module docstring).
        checkpoint_url: named in error messages.

    Raises:
        WorldSizeMismatchError: PER_RANK/PER_GROUP state from another world
            size, or PER_NODE state from another node count, with ``"error"``.
        InvalidArgumentError: an unknown policy, or a bad group (see :func:`placement_for_save`).
    """
    pattern = _pattern(pattern)
    if on_world_size_change not in WORLD_SIZE_POLICIES:
        raise InvalidArgumentError(
            f"on_world_size_change must be one of {WORLD_SIZE_POLICIES}, got {on_world_size_change!r}"
        )
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return component_file_name(key, pattern)
    if pattern is SharingPattern.PER_NODE:
        saved, now, unit = saved_num_nodes, world.num_nodes, "node count"
    else:
        saved, now, unit = saved_world_size, world.world_size, "world size"
    if saved is not None and saved != now:
        if on_world_size_change == "skip":
            return None
        if on_world_size_change == "error":
            where = f" in {checkpoint_url!r}" if checkpoint_url else ""
            raise WorldSizeMismatchError(
                f"cannot restore {pattern.name} component {key!r}{where}: it was saved with {unit} {saved}, "
                f"this job has {now}; pass on_world_size_change='rank0' to give every rank rank 0's copy, "
                "or 'skip' to keep the freshly initialised state; the checkpoint was not modified"
            )
        return component_file_name(key, pattern, rank=0, node=0, group_name=group_name, group_first_rank=0)
    if pattern is SharingPattern.PER_RANK:
        return component_file_name(key, pattern, rank=world.rank)
    if pattern is SharingPattern.PER_NODE:
        return component_file_name(key, pattern, node=world.node_rank)
    members = _group_members(key, world, group_name, group_ranks)
    return component_file_name(key, pattern, group_name=group_name, group_first_rank=members[0])


def _pattern(pattern: SharingPattern | str) -> SharingPattern:
    try:
        return SharingPattern(pattern)
    except ValueError:
        choices = ", ".join(repr(p.value) for p in SharingPattern)
        raise InvalidArgumentError(f"sharing pattern must be one of {choices}, got {pattern!r}") from None


def _index(value: int | None, what: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"component {key!r}: {what} must be a non-negative int, got {value!r}")
    return value


def _group_members(
    key: str, world: RankFacts, group_name: str | None, group_ranks: Sequence[int] | None
) -> tuple[int, ...]:
    """The sorted global ranks of this rank's group, validated."""
    if group_name is None:
        raise InvalidArgumentError(f"PER_GROUP component {key!r} needs a process_group_name")
    if group_ranks is None:
        if world.world_size > 1:
            raise InvalidArgumentError(
                f"PER_GROUP component {key!r}: pass the ranks of group {group_name!r} (World.group_ranks)"
            )
        group_ranks = [world.rank]
    members = tuple(sorted(group_ranks))
    if world.rank not in members:
        raise InvalidArgumentError(
            f"PER_GROUP component {key!r}: rank {world.rank} is not in its group {group_name!r} {list(members)}; "
            "get_process_groups() must return, on each rank, the group that rank belongs to"
        )
    return members
