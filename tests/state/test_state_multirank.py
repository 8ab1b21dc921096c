"""Sharing patterns, World and replication checks on real gloo process groups (2 and 4 CPU ranks)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# The spawned ranks import the scenarios by module name, whatever pytest's import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from state_scenarios import worker  # noqa: E402
from state_spawn import free_port, run_ranks  # noqa: E402

from ckptio.state import SharingPattern  # noqa: E402

P = SharingPattern


# One spawn per world size: starting processes that import torch dominates the cost.
@pytest.fixture(scope="module")
def two_ranks() -> dict[str, list[dict[str, Any]]]:
    results = run_ranks(worker, 2)
    return {"one_host": [r["one_host"] for r in results]}


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    root = str(tmp_path_factory.mktemp("shared_checkpoint"))
    results = run_ranks(worker, 4, root, free_port())
    return {config: [r[config] for r in results] for config in ("one_host", "two_nodes")}


def test_world_two_ranks_on_one_host(two_ranks: dict[str, list[dict[str, Any]]]) -> None:
    assert [r["world"]["facts"] for r in two_ranks["one_host"]] == [(0, 2, 0, 2, 0, 1, (0, 1)), (1, 2, 1, 2, 0, 1, (0, 1))]


def test_world_four_ranks_on_one_host(four_ranks: dict[str, list[dict[str, Any]]]) -> None:
    assert [r["world"]["facts"] for r in four_ranks["one_host"]] == [
        (rank, 4, rank, 4, 0, 1, (0, 1, 2, 3)) for rank in range(4)
    ]


def test_world_four_ranks_as_two_simulated_nodes(four_ranks: dict[str, list[dict[str, Any]]]) -> None:
    # Also shows the cached topology is dropped when the process group is replaced.
    assert [r["world"]["facts"] for r in four_ranks["two_nodes"]] == [
        (0, 4, 0, 2, 0, 2, (0, 1)),
        (1, 4, 1, 2, 0, 2, (0, 1)),
        (2, 4, 0, 2, 1, 2, (2, 3)),
        (3, 4, 1, 2, 1, 2, (2, 3)),
    ]


@pytest.mark.parametrize(("ranks", "config"), [("two_ranks", "one_host"), ("four_ranks", "one_host"), ("four_ranks", "two_nodes")])
def test_barrier_all_gather_broadcast(ranks: str, config: str, request: pytest.FixtureRequest) -> None:
    results = request.getfixturevalue(ranks)[config]
    size = len(results)
    assert [r["world"]["gathered"] for r in results] == [list(range(size))] * size
    assert [r["world"]["broadcast"] for r in results] == [f"from-{size - 1}"] * size
    assert [r["world"]["all"] for r in results] == [list(range(size))] * size
    assert [r["world"]["distributed"] for r in results] == [True] * size


def test_placement_of_every_pattern_on_four_ranks(four_ranks: dict[str, list[dict[str, Any]]]) -> None:
    results = [r["placement"] for r in four_ranks["two_nodes"]]
    assert [r["tp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    by_pattern = {p.value: [r["placements"][p.value] for r in results] for p in P}
    assert by_pattern == {
        "global": [("c_state.pt", True), ("c_state.pt", False), ("c_state.pt", False), ("c_state.pt", False)],
        "replicated": [("c_state.pt", True), ("c_state.pt", False), ("c_state.pt", False), ("c_state.pt", False)],
        "per_rank": [(f"c_state_rank_{r}.pt", True) for r in range(4)],
        "per_group": [
            ("c_state_group_tp_grank_0.pt", True),
            ("c_state_group_tp_grank_0.pt", False),
            ("c_state_group_tp_grank_2.pt", True),
            ("c_state_group_tp_grank_2.pt", False),
        ],
        "per_node": [
            ("c_state_node_0.pt", True),
            ("c_state_node_0.pt", False),
            ("c_state_node_1.pt", True),
            ("c_state_node_1.pt", False),
        ],
    }


@pytest.mark.parametrize("ranks", ["two_ranks", "four_ranks"])
def test_replication_mismatch_is_named_on_every_rank(ranks: str, request: pytest.FixtureRequest) -> None:
    results = [r["replication"] for r in request.getfixturevalue(ranks)["one_host"]]
    last = len(results) - 1
    mismatches = [
        ("opt.optimizer.state.0.exp_avg_sq", [last]),
        ("opt.optimizer.param_groups.0.lr", [last]),
        ("opt.w", [last]),
    ]
    assert [r["drifted"] for r in results] == [("mismatch", ("opt", mismatches, [last]))] * len(results)
    assert [r["same"] for r in results] == [[("ok", None), ("ok", None)]] * len(results)


def test_end_to_end_every_pattern_on_four_ranks(four_ranks: dict[str, list[dict[str, Any]]]) -> None:
    results = [r["end_to_end"] for r in four_ranks["two_nodes"]]
    assert results[0]["files"] == sorted(
        ["global_state.pt", "replicated_state.pt", "per_group_state_group_tp_grank_0.pt",
         "per_group_state_group_tp_grank_2.pt", "per_node_state_node_0.pt", "per_node_state_node_1.pt"]
        + [f"per_rank_state_rank_{r}.pt" for r in range(4)]
    )  # fmt: skip
    # Initial values were 100 * pattern index + rank (REPLICATED: 7 everywhere); each rank
    # must hold its writer's value: rank 0, itself, rank 0, its group's first, its node's first.
    for rank, result in enumerate(results):
        first_of_pair = rank - rank % 2
        assert result["loaded"] == {
            "global": [0.0, 0.0],
            "per_rank": [100.0 + rank] * 2,
            "replicated": [7.0, 7.0],
            "per_group": [300.0 + first_of_pair] * 2,
            "per_node": [400.0 + first_of_pair] * 2,
        }, rank
