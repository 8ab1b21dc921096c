"""The manager with 4 gloo ranks on 2 simulated nodes: every sharing pattern, and replication checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "state"))

from multirank_workers import save_load_every_pattern, save_twice_to_one_id  # noqa: E402
from state_spawn import run_ranks, simulated_nodes_env  # noqa: E402


def test_four_ranks_save_and_restore_every_pattern(tmp_path: Path) -> None:
    output = str(tmp_path / "run")
    results = run_ranks(save_load_every_pattern, 4, output, env=simulated_nodes_env(4, 2), timeout=120)
    for rank, result in enumerate(results):
        node = rank // 2
        assert result["node"] == node
        assert result["model_equal"]
        assert result["loaded"] == {
            "glob": 100,             # written by global rank 0
            "mine": rank,            # each rank its own
            "same": 7,               # identical everywhere, written once
            "pair": 10 + rank // 2 * 2,  # the first rank of this rank's group
            "node": 20 + node * 2,   # local rank 0 of this rank's node
        }
        # the diverged replica is refused on every rank, and nothing is committed
        assert result["mismatch"] is not None and "same" in result["mismatch"]
        assert result["latest"].endswith("checkpoint-1")
    manifest = results[0]["manifest"]
    assert results[0]["world_size"] == 4
    assert manifest["mine"] == ([0, 1, 2, 3], [f"mine_state_rank_{r}.pt" for r in range(4)])
    assert manifest["glob"] == ([0], ["glob_state.pt"])
    assert manifest["same"] == ([0], ["same_state.pt"])
    assert manifest["pair"] == ([0, 2], ["pair_state_group_pairs_grank_0.pt", "pair_state_group_pairs_grank_2.pt"])
    assert manifest["node"] == ([0, 2], ["node_state_node_0.pt", "node_state_node_1.pt"])


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_rank_raises_the_failing_ranks_error_class(tmp_path: Path, world_size: int) -> None:
    results = run_ranks(save_twice_to_one_id, world_size, str(tmp_path / "run"), timeout=120)
    for result in results:
        assert result["type"] == "CheckpointExistsError", result
        assert "rank 0 failed" in result["message"] and "already there" in result["message"], result


def test_a_replication_mismatch_keeps_its_details_on_every_rank(tmp_path: Path) -> None:
    results = run_ranks(save_load_every_pattern, 4, str(tmp_path / "run"), env=simulated_nodes_env(4, 2), timeout=120)
    for result in results:
        assert result["mismatch_type"] == "ReplicationMismatchError", result
        assert result["mismatch_ranks"] == [1], result
