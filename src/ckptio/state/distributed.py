"""Rank facts and the few collectives checkpointing needs; one process is a trivial world.

:meth:`World.current` reads ``torch.distributed`` when a default process group
is initialized and otherwise describes a world of one (rank 0, world size 1,
every collective a no-op), so callers never branch on ``dist.is_initialized()``.

Node topology (``local_rank``, ``local_world_size``, ``node_rank``) comes from
one ``all_gather_object`` of each rank's host name and its ``LOCAL_RANK`` /
``LOCAL_WORLD_SIZE`` environment variables (as ``torchrun`` sets them), made
the first time :meth:`World.current` runs in a process group and cached for
that group. When every rank has the variables and they describe contiguous
blocks of ranks (``torchrun``, SLURM), each block is a node; otherwise ranks
are grouped by host name, nodes ordered by their lowest rank. Because the
result is derived from the same gathered list on every rank, every rank agrees
on it.

**Collective:** with more than one rank, the first ``World.current()`` of a
process group must be called by every rank (as every checkpoint save/load is).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from ckptio.errors import InvalidArgumentError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["NodeTopology", "World", "node_topology"]


@dataclass(frozen=True)
class NodeTopology:
    """Where one rank sits among the nodes of a job."""

    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    node_ranks: tuple[int, ...]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _blocks_from_env(facts: Sequence[tuple[str, int | None, int | None]]) -> list[list[int]] | None:
    """Contiguous blocks of ranks from ``(host, LOCAL_RANK, LOCAL_WORLD_SIZE)``, or None if inconsistent."""
    blocks: list[list[int]] = []
    rank = 0
    while rank < len(facts):
        _, local_rank, size = facts[rank]
        if local_rank != 0 or size is None or size < 1 or rank + size > len(facts):
            return None
        block = list(range(rank, rank + size))
        if any(facts[r][1:] != (r - rank, size) for r in block):
            return None
        blocks.append(block)
        rank += size
    return blocks


def node_topology(rank: int, facts: Sequence[tuple[str, int | None, int | None]]) -> NodeTopology:
    """Derive ``rank``'s node facts from every rank's ``(host name, LOCAL_RANK, LOCAL_WORLD_SIZE)``.

    Pure: the same ``facts`` give the same answer on every rank.
    """
    blocks = _blocks_from_env(facts)
    if blocks is None:
        by_host: dict[str, list[int]] = {}
        for r, (host, _, _) in enumerate(facts):
            by_host.setdefault(host, []).append(r)
        blocks = sorted(by_host.values(), key=lambda ranks: ranks[0])
    for index, block in enumerate(blocks):
        if rank in block:
            return NodeTopology(block.index(rank), len(block), index, len(blocks), tuple(block))
    raise InvalidArgumentError(f"rank {rank} is not among the {len(facts)} ranks gathered")


def _local_facts() -> tuple[str, int | None, int | None]:
    return (socket.gethostname(), _env_int("LOCAL_RANK"), _env_int("LOCAL_WORLD_SIZE"))


# One topology per default process group: (group object, topology). The group is
# held so that its id cannot be reused by a later group.
_TOPOLOGY_CACHE: list[tuple[Any, NodeTopology]] = []


def _current_topology(rank: int, world_size: int) -> NodeTopology:
    default_group = dist.group.WORLD
    for group, topology in _TOPOLOGY_CACHE:
        if group is default_group:
            return topology
    facts: list[Any] = [None] * world_size
    dist.all_gather_object(facts, _local_facts())
    topology = node_topology(rank, [tuple(f) for f in facts])
    _TOPOLOGY_CACHE[:] = [(default_group, topology)]
    return topology


@dataclass(frozen=True)
class World:
    """This rank's place in the job, and collectives that degrade to no-ops in one process.

    Attributes:
        rank, world_size: global rank and number of ranks.
        local_rank, local_world_size: rank within this node and ranks on it.
        node_rank, num_nodes: index of this node (nodes ordered by lowest rank) and node count.
        node_ranks: the global ranks on this node.
        process_groups: the provider's named groups (each rank's own group per name).
        collective_group: the process group this World's own collectives use
            (None: the default group). A thread other than the training loop's
            must use a group of its own (:meth:`on_own_group`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    node_ranks: tuple[int, ...] = (0,)
    process_groups: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    collective_group: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def current(cls, process_groups: Mapping[str, ProcessGroup] | None = None) -> World:
        """Describe this process: from ``torch.distributed`` if initialized, else a world of one.

        Collective the first time per process group when there are several ranks
        (see the module docstring): call it on every rank.
        """
        groups = dict(process_groups or {})
        if not (dist.is_available() and dist.is_initialized()):
            return cls(process_groups=groups)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if world_size == 1:
            return cls(process_groups=groups)
        topo = _current_topology(rank, world_size)
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=topo.local_rank,
            local_world_size=topo.local_world_size,
            node_rank=topo.node_rank,
            num_nodes=topo.num_nodes,
            node_ranks=topo.node_ranks,
            process_groups=groups,
        )

    @property
    def is_distributed(self) -> bool:
        """Whether collectives actually talk to other ranks.

        A World on a group of its own stays distributed even once the default
        group is destroyed: its collectives then fail, rather than quietly
        running as if this rank were alone (a background save would commit
        only its own files).
        """
        if self.world_size == 1:
            return False
        return self.collective_group is not None or (dist.is_available() and dist.is_initialized())

    def barrier(self) -> None:
        """Wait for every rank (no-op in a world of one)."""
        if self.is_distributed:
            dist.barrier(group=self.collective_group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Return every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` in a world of one."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.collective_group)
        return gathered

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Return rank ``src``'s ``obj`` on every rank (other ranks' ``obj`` is ignored)."""
        if not 0 <= src < self.world_size:
            raise InvalidArgumentError(f"broadcast source rank {src} is outside world of size {self.world_size}")
        if not self.is_distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.collective_group)
        return box[0]

    def on_own_group(self, timeout_s: float | None = None) -> World:
        """This World with collectives on a new gloo group over every rank (itself when not distributed).

        ``timeout_s`` bounds how long each of its collectives waits for the
        other ranks (None: torch's default for the backend).

        Collectives issued from a background thread on the default group could
        interleave with the training loop's own and deadlock; on a group of
        their own they cannot. Creating the group is a collective of the
        default group: call it on every rank, in the same order.
        """
        if not self.is_distributed:
            return self
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        return replace(self, collective_group=dist.new_group(backend="gloo", timeout=timeout))

    def group(self, name: str) -> ProcessGroup:
        """This rank's process group called ``name``.

        Raises:
            InvalidArgumentError: the provider returned no group of that name.
        """
        if name not in self.process_groups:
            raise InvalidArgumentError(
                f"no process group named {name!r}; get_process_groups() returned {sorted(self.process_groups)}"
            )
        group: ProcessGroup = self.process_groups[name]
        return group

    def group_ranks(self, group: ProcessGroup | str | None = None) -> list[int]:
        """Global ranks of ``group`` (a ProcessGroup, a name from ``process_groups``, or None for all).

        In a world of one every group is ``[0]``, named or not. Not collective.

        Raises:
            InvalidArgumentError: an unknown group name in a world of several ranks.
        """
        if group is None:
            return list(range(self.world_size))
        if not self.is_distributed:
            return [0]
        if isinstance(group, str):
            group = self.group(group)
        return list(dist.get_process_group_ranks(group))
