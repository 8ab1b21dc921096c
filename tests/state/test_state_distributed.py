from __future__ import annotations

import pytest

from ckptio.errors import InvalidArgumentError
from ckptio.state import NodeTopology, World, node_topology


def test_without_process_group_the_world_is_trivial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    world = World.current()
    facts = (world.rank, world.world_size, world.local_rank, world.local_world_size, world.node_rank)
    assert facts == (0, 1, 0, 1, 0)
    assert (world.num_nodes, world.node_ranks, world.is_distributed) == (1, (0,), False)
    world.barrier()
    assert world.all_gather_object({"a": 1}) == [{"a": 1}]
    assert world.broadcast_object("x", src=0) == "x"
    assert world.group_ranks() == [0]
    assert world.group_ranks("tp") == [0]  # every group is {0} in a world of one


def test_process_groups_are_kept_and_looked_up_by_name() -> None:
    marker = object()
    world = World.current({"tp": marker})  # type: ignore[dict-item]
    assert world.group("tp") is marker
    with pytest.raises(InvalidArgumentError, match=r"'dp'.*\['tp'\]"):
        world.group("dp")


def test_broadcast_source_must_be_in_the_world() -> None:
    with pytest.raises(InvalidArgumentError, match="source rank 1"):
        World().broadcast_object(1, src=1)


def _env_facts(world_size: int, per_node: int) -> list[tuple[str, int | None, int | None]]:
    return [("host", r % per_node, per_node) for r in range(world_size)]


def test_topology_from_torchrun_env_blocks() -> None:
    facts = _env_facts(4, 2)
    assert [node_topology(r, facts) for r in range(4)] == [
        NodeTopology(0, 2, 0, 2, (0, 1)),
        NodeTopology(1, 2, 0, 2, (0, 1)),
        NodeTopology(0, 2, 1, 2, (2, 3)),
        NodeTopology(1, 2, 1, 2, (2, 3)),
    ]


def test_topology_from_host_names_when_env_is_missing_or_inconsistent() -> None:
    hosts = [("b", None, None), ("a", None, None), ("b", None, None), ("a", None, None)]
    assert [node_topology(r, hosts) for r in range(4)] == [
        NodeTopology(0, 2, 0, 2, (0, 2)),
        NodeTopology(0, 2, 1, 2, (1, 3)),
        NodeTopology(1, 2, 0, 2, (0, 2)),
        NodeTopology(1, 2, 1, 2, (1, 3)),
    ]
    # LOCAL_RANK set on only some ranks, or not describing blocks: host names decide.
    mixed = [("h", 0, 2), ("h", None, None), ("h", 0, 2), ("h", 1, 2)]
    assert node_topology(3, mixed) == NodeTopology(3, 4, 0, 1, (0, 1, 2, 3))
    shuffled = [("h", 1, 2), ("h", 0, 2), ("h", 1, 2), ("h", 0, 2)]
    assert node_topology(0, shuffled).num_nodes == 1


def test_topology_unknown_rank() -> None:
    with pytest.raises(InvalidArgumentError):
        node_topology(5, _env_facts(2, 2))
