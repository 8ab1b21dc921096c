"""Data-parallel saves split the weight shards between ranks; resumes can read once per node.

gloo ranks in spawned processes (hard timeouts), on local disk, S3 and GCS
(``memory://`` lives inside one process, so spawned ranks cannot share it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest
import safetensors.torch
import torch
from save_across_ranks_workers import (
    Net,
    fail_while_writing_shards,
    resume,
    resume_that_fails,
    save_split,
)

from ckptio import load_checkpoint
from ckptio.checkpoint import read_manifest, verify_checkpoint
from ckptio.storage import open_storage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "state"))
from state_spawn import run_ranks, simulated_nodes_env  # noqa: E402

INDEX = "model.safetensors.index.json"
MANIFEST = "checkpoint_manifest.json"
TIMEOUT = 240


def shared_target(backend_url: Any) -> tuple[str, dict[str, Any]]:
    if backend_url.name == "memory":
        pytest.skip("memory:// is private to each process; spawned ranks cannot share it")
    return backend_url.url, backend_url.storage_options


def read_object(path: str, name: str, options: dict[str, Any]) -> bytes:
    """An object's bytes with plain fsspec (no ckptio)."""
    fs, root = fsspec.core.url_to_fs(path, **options)
    return bytes(fs.cat_file(f"{root}/{name}"))


def shards_by_kind(events: list[tuple[str, str, int]], kind: str) -> set[str]:
    return {name for k, name, _ in events if k == kind and name.endswith(".safetensors")}


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_writes_a_distinct_share_and_rank_zero_commits_last(backend_url: Any, world_size: int) -> None:
    url, options = shared_target(backend_url)
    results = run_ranks(save_split, world_size, url, options, timeout=TIMEOUT)
    path = results[0]["path"]
    index = json.loads(read_object(path, INDEX, options))
    planned = set(index["weight_map"].values())
    assert len(planned) >= world_size  # the small shard size gives every rank work

    shares = [shards_by_kind(r["events"], "commit") for r in results]
    for rank, share in enumerate(shares):
        assert share, f"rank {rank} wrote no shard"
        assert shards_by_kind(results[rank]["events"], "open") == share
        for other in range(rank + 1, world_size):
            assert not share & shares[other], (rank, other, shares)
    assert set().union(*shares) == planned

    # Balanced by bytes: no rank holds more than the average plus the largest shard.
    sizes = {name: len(read_object(path, name, options)) for name in planned}
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) <= sum(loads) / world_size + max(sizes.values())

    # The index and the manifest: one copy each, by rank 0, after every rank's last shard.
    last_shard = max(t for r in results for k, n, t in r["events"] if k == "commit" and n.endswith(".safetensors"))
    for rank, result in enumerate(results):
        written = [(n, t) for k, n, t in result["events"] if k == "write" and n in (INDEX, MANIFEST)]
        if rank == 0:
            (index_at,) = [t for n, t in written if n == INDEX]
            (manifest_at,) = [t for n, t in written if n == MANIFEST]
            assert last_shard < index_at < manifest_at
        else:
            assert written == []

    # The manifest lists every file with its size and CRC32C, and they match.
    manifest = read_manifest(open_storage(path, **options))
    assert manifest is not None
    assert {r.path for r in manifest.files} >= planned | {INDEX}
    assert verify_checkpoint(path, storage_options=options) == []

    # Plain safetensors reads the shards bit for bit; ckptio loads and re-ties them.
    expected = Net(seed=0).state_dict()
    plain: dict[str, torch.Tensor] = {}
    for name in sorted(planned):
        plain.update(safetensors.torch.load(read_object(path, name, options)))
    assert plain.keys() == expected.keys() - {"head.weight"}  # the tied alias is stored once
    for name, tensor in plain.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    loaded = Net(seed=5)
    assert not torch.equal(loaded.body[0].weight, expected["body.0.weight"])
    load_checkpoint(path, loaded, storage_options=options)
    assert loaded.head.weight is loaded.embed.weight
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_rank_failing_mid_shard_commits_nothing(backend_url: Any, world_size: int) -> None:
    url, options = shared_target(backend_url)
    failing = world_size - 1
    results = run_ranks(fail_while_writing_shards, world_size, url, options, failing, timeout=TIMEOUT)
    assert results[failing]["tripped"] is True
    for result in results:
        assert result["error"] == "InjectedFault", result
        assert f"rank {failing} failed" in result["message"], result
        assert result["latest"].endswith("checkpoint-1"), result
    second = open_storage(url, **options).child("checkpoints/checkpoint-2")
    left = set(second.list(""))
    assert INDEX not in left and MANIFEST not in left, left
    assert verify_checkpoint(url + "/checkpoints/checkpoint-1", storage_options=options) == []


def _readers(world_size: int, env: list[dict[str, str]] | None) -> set[int]:
    if env is None:
        return {0}
    per_node = int(env[0]["LOCAL_WORLD_SIZE"])
    return set(range(0, world_size, per_node))


@pytest.mark.parametrize(
    ("world_size", "per_node"), [(2, None), (4, 2)], ids=["2-ranks-1-node", "4-ranks-2-nodes"]
)
@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "every-rank-reads"])
def test_resume_reads_weights_once_per_node_with_load_broadcast(
    backend_url: Any, world_size: int, per_node: int | None, broadcast: bool
) -> None:
    url, options = shared_target(backend_url)
    env = simulated_nodes_env(world_size, per_node) if per_node else None
    results = run_ranks(resume, world_size, url, options, broadcast, env=env, timeout=TIMEOUT)
    readers = _readers(world_size, env) if broadcast else set(range(world_size))
    shards = {n for k, n, _ in results[0]["events"] if k == "read" and n.endswith(".safetensors")}
    assert len(shards) > 1
    for rank, result in enumerate(results):
        assert result["differed"]
        weight_reads = [n for k, n, _ in result["events"] if k == "read" and (n.endswith(".safetensors") or n == INDEX)]
        if rank in readers:
            assert {n for n in weight_reads if n != INDEX} == shards, (rank, weight_reads)
        else:
            assert weight_reads == [], (rank, weight_reads)
        # components are still read by every rank
        assert result["step"] == 100 + rank
        # bit-identical to the saved model, tie restored
        tensors, saved_tensors = safetensors.torch.load(result["tensors"]), safetensors.torch.load(result["saved"])
        assert tensors.keys() == saved_tensors.keys()
        for name, tensor in tensors.items():
            saved = saved_tensors[name]
            assert tensor.dtype == saved.dtype and torch.equal(tensor, saved), (rank, name)
        assert result["tied"]


@pytest.mark.parametrize("how", ["model", "shard"])
@pytest.mark.parametrize(("world_size", "per_node"), [(2, None), (4, 2)], ids=["2-ranks", "4-ranks-2-nodes"])
def test_a_failed_broadcast_resume_raises_on_every_rank(tmp_path: Path, how: str, world_size: int,
                                                       per_node: int | None) -> None:
    env = simulated_nodes_env(world_size, per_node) if per_node else None
    results = run_ranks(resume_that_fails, world_size, str(tmp_path / "run"), {}, how, env=env, timeout=TIMEOUT)
    for rank, result in enumerate(results):
        assert result["error"] is not None, (rank, result)
        if how == "model":
            assert result["error"] == "StateDictMismatchError", (rank, result)
            assert f"rank {world_size - 1}" in result["message"], (rank, result)
        else:
            assert "rank 0 failed" in result["message"], (rank, result)
