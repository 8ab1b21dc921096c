"""Pipeline-style saves: one shared index, each stage writes only its own shards."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ckptio.errors import InvalidArgumentError, StateDictMismatchError
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


class _Stage(nn.Module):
    """One pipeline stage: the layers it owns keep their global names, as in a split model."""

    def __init__(self, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        if first:
            self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleDict({str(i): nn.Linear(4, 4) for i in layers})
        if last:
            self.head = nn.Linear(4, 10, bias=False)


def _pipeline(stages: int, seed: int) -> list[_Stage]:
    torch.manual_seed(seed)
    return [
        _Stage(range(2 * s, 2 * s + 2), first=s == 0, last=s == stages - 1) for s in range(stages)
    ]


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_each_stage_loads_its_part_of_one_shared_index_strictly(
    storage: Storage, stages: int, safetensors: bool
) -> None:
    saved = _pipeline(stages, seed=0)
    index = make_shard_index([s.state_dict() for s in saved], safetensors=safetensors, max_shard_size=200)
    index_name = SAFE_WEIGHTS_INDEX_NAME if safetensors else WEIGHTS_INDEX_NAME
    save_shard_index(index, storage, index_name)
    for stage in saved:  # one rank per stage in a real run
        save_sharded_checkpoint(storage, index, stage, safetensors=safetensors)

    for number, (fresh, original) in enumerate(zip(_pipeline(stages, seed=1), saved, strict=True)):
        # The index holds every stage's tensors; strict means "all of this stage's", no more.
        load_checkpoint(storage, fresh, strict=True)
        assert fresh.state_dict().keys() == original.state_dict().keys()
        for name, tensor in original.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0, msg=f"stage {number} {name}")
        again = _pipeline(stages, seed=2)[number]
        assert load_sharded_checkpoint(storage, index, again, safetensors=safetensors, strict=True) == set()
        for name, tensor in original.state_dict().items():
            torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0)


def test_a_stage_missing_from_the_index_is_still_refused_when_strict(storage: Storage) -> None:
    saved = _pipeline(2, seed=0)
    index = make_shard_index([saved[0].state_dict()], safetensors=True)  # stage 1 never planned
    save_sharded_checkpoint(storage, index, saved[0], safetensors=True)
    save_shard_index(index, storage, SAFE_WEIGHTS_INDEX_NAME)
    with pytest.raises(StateDictMismatchError, match=r"missing 'layers\.2\.weight'"):
        load_checkpoint(storage, _pipeline(2, seed=1)[1], strict=True)


def test_load_sharded_checkpoint_returns_the_keys_it_did_not_load(storage: Storage) -> None:
    saved = _pipeline(2, seed=0)
    index = make_shard_index([saved[0].state_dict()], safetensors=False)
    save_sharded_checkpoint(storage, index, saved[0])
    bigger = _Stage(range(0, 3), first=True, last=False)  # has layers.2, which the index lacks
    with pytest.raises(StateDictMismatchError, match=r"missing 'layers\.2\.weight', 'layers\.2\.bias'"):
        load_sharded_checkpoint(storage, index, bigger, strict=True)
    unloaded = load_sharded_checkpoint(storage, index, bigger, strict=False)
    assert unloaded == {"layers.2.weight", "layers.2.bias"}
    torch.testing.assert_close(bigger.layers["1"].weight, saved[0].layers["1"].weight, rtol=0, atol=0)
    everything = load_sharded_checkpoint(storage, index)
    assert isinstance(everything, dict) and everything.keys() == saved[0].state_dict().keys()


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "quiet"])
def test_load_sharded_checkpoint_logs_each_file_at_info_with_debug(
    storage: Storage, caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    state = _pipeline(1, seed=0)[0].state_dict()
    index = make_shard_index([state], safetensors=True, max_shard_size=200)
    save_sharded_checkpoint(storage, index, state, safetensors=True)
    shards = {storage.url_of(f) for f in index["weight_map"].values()}
    assert len(shards) > 1
    with caplog.at_level(logging.INFO, logger="ckptio"):
        load_sharded_checkpoint(storage, index, _pipeline(1, seed=1)[0], safetensors=True, debug=debug)
    logged = {url for url in shards for record in caplog.records if url in record.getMessage()}
    assert logged == (shards if debug else set())
