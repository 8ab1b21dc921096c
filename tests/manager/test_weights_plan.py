"""Planning a multi-rank weights save: shard size, assignment of shards to ranks, the index gate. No ranks."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from ckptio.errors import InvalidArgumentError
from ckptio.format import make_shard_index
from ckptio.manager.weights import (
    MIN_SPLIT_SHARD_SIZE,
    assign_shards,
    plan_for_world,
    plan_weights,
    publish_weights_index,
    split_shard_size,
    write_weights_share,
)
from ckptio.storage import open_storage

MiB = 2**20


def test_a_world_of_one_keeps_the_configured_shard_size() -> None:
    assert split_shard_size(10 * 2**30, 1, 2**31) == 2**31


def test_several_ranks_get_a_shard_each_when_the_model_is_big_enough() -> None:
    assert split_shard_size(1024 * MiB, 4, 2**31) == 256 * MiB
    assert split_shard_size(1024 * MiB + 1, 4, 2**31) == 256 * MiB + 1  # rounded up, never N+1 shards for a byte


def test_small_models_are_not_cut_below_the_floor_nor_above_the_limit() -> None:
    assert split_shard_size(100 * MiB, 4, 2**31) == MIN_SPLIT_SHARD_SIZE == 64 * MiB
    assert split_shard_size(100 * MiB, 4, 10 * MiB) == 10 * MiB  # the caller's limit wins
    assert split_shard_size(8 * 2**30, 2, 2**31) == 2**31
    assert split_shard_size(1000, 4, 2**31, floor=100) == 250


def test_bad_world_or_shard_size_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        split_shard_size(10, 0, 100)
    with pytest.raises(InvalidArgumentError):
        assign_shards({"a": 1}, 0)


def test_shards_go_largest_first_to_the_least_loaded_rank() -> None:
    shares = assign_shards({"a": 10, "b": 9, "c": 5, "d": 4, "e": 1}, 2)
    assert shares == (("a", "d", "e"), ("b", "c"))


def test_more_ranks_than_shards_leaves_some_ranks_idle() -> None:
    assert assign_shards({"x": 3, "y": 5}, 4) == (("y",), ("x",), (), ())


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_assignment_is_a_partition_balanced_within_one_shard(world_size: int) -> None:
    rng = random.Random(world_size)
    sizes = {f"model-{i:05d}.safetensors": rng.randint(1, 1000) for i in range(37)}
    shares = assign_shards(sizes, world_size)
    assert assign_shards(dict(reversed(list(sizes.items()))), world_size) == shares  # deterministic
    flat = [name for share in shares for name in share]
    assert sorted(flat) == sorted(sizes) and len(flat) == len(set(flat))
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values())


def big_meta_model() -> nn.Module:
    """512 MiB of weights, planned without allocating them."""
    with torch.device("meta"):
        return nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(8)])


def test_a_model_that_fits_one_shard_is_split_so_every_rank_writes() -> None:
    model = big_meta_model()
    single = make_shard_index([model.state_dict()], safetensors=True)
    assert len(set(single["weight_map"].values())) == 1  # the default limit: one shard
    plan = plan_weights(model, world_size=4, safetensors=True, max_shard_size=2**31)
    files = set(plan.shard_index["weight_map"].values())
    assert len(files) >= 4
    assert all(plan.files_of(rank) for rank in range(4))
    assert sorted(f for rank in range(4) for f in plan.files_of(rank)) == sorted(files)
    assert plan.index_name == "model.safetensors.index.json"
    assert plan.shard_index["metadata"]["total_size"] == single["metadata"]["total_size"]


def test_a_world_of_one_has_no_split_plan() -> None:
    assert plan_for_world(big_meta_model(), 1, safetensors=True, max_shard_size=2**31) is None
    assert plan_for_world(None, 4, safetensors=True, max_shard_size=2**31) is None
    assert plan_for_world(big_meta_model(), 2, safetensors=False, max_shard_size=2**31) is not None


def test_tied_weights_are_planned_once() -> None:
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight
    plan = plan_weights(model, world_size=2, safetensors=True, max_shard_size=2**31)
    assert "1.weight" not in plan.shard_index["weight_map"]
    assert plan.shard_index["metadata"]["param_sharing"] == [["0.weight", "1.weight"]]


def test_the_index_is_not_published_while_a_shard_is_missing() -> None:
    storage = open_storage("memory://ckptio-test/weights-plan-gate")
    storage.delete_prefix("")
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    plan = plan_weights(model, world_size=2, safetensors=True, max_shard_size=300)
    assert all(plan.files_of(r) for r in range(2))
    records = write_weights_share(storage, plan, model, 0)
    with pytest.raises(InvalidArgumentError, match="were not written"):
        publish_weights_index(storage, plan, records)
    assert not storage.exists(plan.index_name)
    records += write_weights_share(storage, plan, model, 1)
    publish_weights_index(storage, plan, records)
    assert storage.exists(plan.index_name)
    storage.delete_prefix("")
