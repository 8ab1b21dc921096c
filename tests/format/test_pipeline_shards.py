"""Pipeline-style saves: one shared index, each stage writes only its own shards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckptio.errors import InvalidArgumentError
from ckptio.format import (
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    load_checkpoint,
    load_shard_index,
    load_sharded_checkpoint,
    make_shard_index,
    save_shard_index,
    save_sharded_checkpoint,
)
from ckptio.storage import Storage


def _stages(seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    first = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    last = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 10))
    return [first, last]


def _prefixed(stages: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{f"stage{i}.{k}": v for k, v in s.state_dict().items()} for i, s in enumerate(stages)]


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_each_stage_writes_its_shards_against_one_index(storage: Storage, safetensors: bool) -> None:
    states = _prefixed(_stages(0))
    index = make_shard_index(states, safetensors=safetensors, max_shard_size=400, metadata={"stages": 2})
    written = []
    for state in states:  # in a real run, one rank per stage
        before = set(storage.list())
        save_sharded_checkpoint(storage, index, state, safetensors=safetensors)
        written.append(set(storage.list()) - before)
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] == {index["weight_map"][k] for k in states[0]}
    index_name = SAFE_WEIGHTS_INDEX_NAME if safetensors else WEIGHTS_INDEX_NAME
    assert not storage.exists(index_name)  # nothing is committed until the index is published
    save_shard_index(index, storage, index_name)

    assert load_shard_index(storage, index_name) == index
    loaded = load_sharded_checkpoint(storage, index, safetensors=safetensors)
    assert loaded is not None
    assert all(torch.equal(loaded[k], v) for state in states for k, v in state.items())
    # A rank restores just its stage: only its tensors are read.
    keys = list(states[1])
    stage1 = load_checkpoint(storage, keys=keys)
    assert stage1 is not None and list(stage1) == keys
    assert all(torch.equal(stage1[k], states[1][k]) for k in keys)


def test_a_stage_missing_a_tensor_of_its_shard_is_refused(storage: Storage) -> None:
    states = _prefixed(_stages(0))
    index = make_shard_index(states, safetensors=True, max_shard_size=10**6)
    partial = dict(states[0])
    partial.pop("stage0.1.bias")
    with pytest.raises(InvalidArgumentError, match="stage0.1.bias"):
        save_sharded_checkpoint(storage, index, partial, safetensors=True)
    with pytest.raises(InvalidArgumentError, match="no place for"):
        save_sharded_checkpoint(storage, index, {"other": torch.ones(1)}, safetensors=True)
    assert storage.list() == []


def test_format_must_match_the_index(storage: Storage) -> None:
    states = _prefixed(_stages(0))
    index = make_shard_index(states, safetensors=True)
    with pytest.raises(InvalidArgumentError, match="other format"):
        save_sharded_checkpoint(storage, index, states[0], safetensors=False)


def test_weights_tied_across_stages_are_stored_once(storage: Storage) -> None:
    first, last = _stages(0)
    last[1].weight = first[0].weight  # the head shares the embedding of stage 0
    states = _prefixed([first, last])
    sharing = [["stage0.0.weight", "stage1.1.weight"]]
    index = make_shard_index(states, safetensors=True, param_sharing_metadata=sharing)
    for state in states:
        save_sharded_checkpoint(storage, index, state, safetensors=True)
    save_shard_index(index, storage, SAFE_WEIGHTS_INDEX_NAME)
    loaded = load_checkpoint(storage)
    assert loaded is not None and loaded["stage1.1.weight"] is loaded["stage0.0.weight"]
    assert torch.equal(loaded["stage1.1.weight"], first[0].weight)
