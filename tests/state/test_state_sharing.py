from __future__ import annotations

import pytest

from ckptio.errors import InvalidArgumentError, WorldSizeMismatchError
from ckptio.state import (
    ComponentPlacement,
    RankInfo,
    SharingPattern,
    component_file_name,
    file_for_load,
    placement_for_save,
)

P = SharingPattern


def _groups_of_two(rank: int) -> list[int]:
    first = rank - rank % 2
    return [first, first + 1]


def test_file_names_follow_the_spec_layout() -> None:
    assert component_file_name("optimizer", P.GLOBAL) == "optimizer_state.pt"
    assert component_file_name("optimizer", "replicated") == "optimizer_state.pt"
    assert component_file_name("rng", P.PER_RANK, rank=3) == "rng_state_rank_3.pt"
    assert component_file_name("cache", P.PER_NODE, node=1) == "cache_state_node_1.pt"
    assert (
        component_file_name("ema", P.PER_GROUP, group_name="tp", group_first_rank=4)
        == "ema_state_group_tp_grank_4.pt"
    )


@pytest.mark.parametrize(
    ("pattern", "kwargs"),
    [(P.PER_RANK, {}), (P.PER_NODE, {"node": -1}), (P.PER_GROUP, {"group_first_rank": 0}), ("bogus", {})],
)
def test_file_name_needs_the_pattern_index(pattern: P | str, kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidArgumentError):
        component_file_name("x", pattern, **kwargs)


def test_world_of_one_writes_and_reads_every_pattern() -> None:
    one = RankInfo()
    expected = {
        P.GLOBAL: "c_state.pt",
        P.REPLICATED: "c_state.pt",
        P.PER_RANK: "c_state_rank_0.pt",
        P.PER_GROUP: "c_state_group_g_grank_0.pt",
        P.PER_NODE: "c_state_node_0.pt",
    }
    for pattern, name in expected.items():
        placement = placement_for_save(pattern, "c", one, group_name="g")
        assert placement == ComponentPlacement(name, True, 0, (0,))
        assert file_for_load(pattern, "c", one, saved_world_size=1, saved_num_nodes=1, group_name="g") == name


def _table(pattern: P, world_size: int = 4, per_node: int = 2) -> list[tuple[str, bool, int, tuple[int, ...]]]:
    rows = []
    for rank in range(world_size):
        p = placement_for_save(
            pattern, "c", RankInfo.contiguous(rank, world_size, per_node), group_name="tp",
            group_ranks=_groups_of_two(rank)[::-1],  # order must not matter
        )  # fmt: skip
        rows.append((p.file_name, p.writes, p.writer_rank, p.shared_by))
    return rows


def test_placement_global_and_replicated_rank0_writes_once() -> None:
    for pattern in (P.GLOBAL, P.REPLICATED):
        assert _table(pattern) == [("c_state.pt", r == 0, 0, (0, 1, 2, 3)) for r in range(4)]


def test_placement_per_rank_every_rank_its_own_file() -> None:
    assert _table(P.PER_RANK) == [(f"c_state_rank_{r}.pt", True, r, (r,)) for r in range(4)]


def test_placement_per_group_lowest_rank_of_each_group_writes() -> None:
    assert _table(P.PER_GROUP) == [
        ("c_state_group_tp_grank_0.pt", True, 0, (0, 1)),
        ("c_state_group_tp_grank_0.pt", False, 0, (0, 1)),
        ("c_state_group_tp_grank_2.pt", True, 2, (2, 3)),
        ("c_state_group_tp_grank_2.pt", False, 2, (2, 3)),
    ]


def test_placement_per_node_local_rank0_writes() -> None:
    assert _table(P.PER_NODE) == [
        ("c_state_node_0.pt", True, 0, (0, 1)),
        ("c_state_node_0.pt", False, 0, (0, 1)),
        ("c_state_node_1.pt", True, 2, (2, 3)),
        ("c_state_node_1.pt", False, 2, (2, 3)),
    ]


@pytest.mark.parametrize("pattern", list(P))
def test_every_file_has_exactly_one_writer_and_every_read_was_written(pattern: P) -> None:
    world_size, per_node = 8, 4
    writers: dict[str, list[int]] = {}
    reads = []
    for rank in range(world_size):
        info = RankInfo.contiguous(rank, world_size, per_node)
        placement = placement_for_save(pattern, "c", info, group_name="tp", group_ranks=_groups_of_two(rank))
        if placement.writes:
            writers.setdefault(placement.file_name, []).append(rank)
        reads.append(
            file_for_load(
                pattern, "c", info, saved_world_size=world_size, saved_num_nodes=2,
                group_name="tp", group_ranks=_groups_of_two(rank),
            )  # fmt: skip
        )
    assert all(len(ranks) == 1 for ranks in writers.values()), writers
    assert set(reads) == set(writers)


def test_per_group_with_uneven_groups() -> None:
    groups = {0: [0, 3], 3: [0, 3], 1: [1, 2], 2: [1, 2]}
    names = {
        r: placement_for_save(P.PER_GROUP, "c", RankInfo.contiguous(r, 4), group_name="dp", group_ranks=groups[r])
        for r in range(4)
    }
    assert [(p.file_name, p.writes) for p in names.values()] == [
        ("c_state_group_dp_grank_0.pt", True),
        ("c_state_group_dp_grank_1.pt", True),
        ("c_state_group_dp_grank_1.pt", False),
        ("c_state_group_dp_grank_0.pt", False),
    ]


def test_per_group_errors() -> None:
    info = RankInfo.contiguous(1, 4)
    with pytest.raises(InvalidArgumentError, match="not in its group"):
        placement_for_save(P.PER_GROUP, "c", info, group_name="tp", group_ranks=[2, 3])
    with pytest.raises(InvalidArgumentError, match="World.group_ranks"):
        placement_for_save(P.PER_GROUP, "c", info, group_name="tp")
    with pytest.raises(InvalidArgumentError, match="process_group_name"):
        placement_for_save(P.PER_GROUP, "c", info, group_ranks=[0, 1])


def test_global_and_replicated_reload_at_any_world_size() -> None:
    for pattern in (P.GLOBAL, P.REPLICATED):
        got = file_for_load(pattern, "c", RankInfo.contiguous(5, 8), saved_world_size=2, saved_num_nodes=1)
        assert got == "c_state.pt"


def test_per_rank_from_another_world_size_is_a_clear_error() -> None:
    with pytest.raises(WorldSizeMismatchError, match=r"'s3://b/ck'.*world size 4, this job has 2.*rank0") as info:
        file_for_load(
            P.PER_RANK, "rng", RankInfo.contiguous(1, 2), saved_world_size=4, checkpoint_url="s3://b/ck"
        )
    assert isinstance(info.value, ValueError)
    assert "'rng'" in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "rank0_file"),
    [
        (P.PER_RANK, "c_state_rank_0.pt"),
        (P.PER_GROUP, "c_state_group_tp_grank_0.pt"),
        (P.PER_NODE, "c_state_node_0.pt"),
    ],
)
def test_world_size_fallbacks(pattern: P, rank0_file: str) -> None:
    info = RankInfo.contiguous(3, 4, 2)
    kwargs = {"saved_world_size": 8, "saved_num_nodes": 4, "group_name": "tp", "group_ranks": [2, 3]}
    with pytest.raises(WorldSizeMismatchError):
        file_for_load(pattern, "c", info, **kwargs)  # type: ignore[arg-type]
    assert file_for_load(pattern, "c", info, on_world_size_change="rank0", **kwargs) == rank0_file  # type: ignore[arg-type]
    assert file_for_load(pattern, "c", info, on_world_size_change="skip", **kwargs) is None  # type: ignore[arg-type]


def test_per_node_checks_node_count_not_world_size() -> None:
    info = RankInfo.contiguous(3, 4, 2)
    assert file_for_load(P.PER_NODE, "c", info, saved_world_size=8, saved_num_nodes=2) == "c_state_node_1.pt"
    assert file_for_load(P.PER_NODE, "c", info, saved_world_size=8) == "c_state_node_1.pt"
    with pytest.raises(WorldSizeMismatchError, match="node count 1"):
        file_for_load(P.PER_NODE, "c", info, saved_world_size=4, saved_num_nodes=1)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="on_world_size_change"):
        file_for_load(P.GLOBAL, "c", RankInfo(), saved_world_size=1, on_world_size_change="ignore")


def test_rank_info_contiguous() -> None:
    assert RankInfo.contiguous(5, 8, 4) == RankInfo(5, 8, 1, 1, 2, (4, 5, 6, 7))
    assert RankInfo.contiguous(2, 4) == RankInfo(2, 4, 2, 0, 1, (0, 1, 2, 3))
    with pytest.raises(InvalidArgumentError):
        RankInfo.contiguous(0, 6, 4)
