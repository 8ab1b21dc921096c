"""Index metadata: caller metadata and ``param_sharing`` recorded as given, library keys recomputed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckptio.format import (
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    load_checkpoint,
    load_shard_index,
    make_shard_index,
    save_checkpoint,
    save_shard_index,
    save_sharded_checkpoint,
)
from ckptio.storage import Storage

FORMATS = pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])


class _Tied(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        if tie:
            self.head.weight = self.emb.weight


def _index_name(safetensors: bool) -> str:
    return SAFE_WEIGHTS_INDEX_NAME if safetensors else WEIGHTS_INDEX_NAME


@FORMATS
def test_resaving_with_a_loaded_index_metadata_recomputes_the_library_keys(storage: Storage, safetensors: bool) -> None:
    first, second = storage.child("first"), storage.child("second")
    save_checkpoint(first, _Tied(tie=True), metadata={"step": 7, "dtype": "float32"}, safetensors=safetensors)
    loaded_metadata = load_shard_index(first, _index_name(safetensors))["metadata"]
    assert loaded_metadata == {
        "total_size": (6 * 4 + 4 * 4 + 4) * 4,
        "step": 7,
        "dtype": "float32",
        "param_sharing": [["emb.weight", "head.weight"]],
    }

    untied = _Tied(tie=False)
    save_checkpoint(second, untied, metadata=loaded_metadata, safetensors=safetensors)
    resaved = load_shard_index(second, _index_name(safetensors))
    # The new model is not tied: its size counts the head, and no stale sharing is carried over.
    assert resaved["metadata"] == {"total_size": (6 * 4 * 2 + 4 * 4 + 4) * 4, "step": 7, "dtype": "float32"}
    target = _Tied(tie=False)
    load_checkpoint(second, target, strict=True)
    assert target.head.weight is not target.emb.weight
    for name, tensor in untied.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], tensor, rtol=0, atol=0)


@FORMATS
def test_a_pipeline_index_is_planned_again_from_a_loaded_index_metadata(storage: Storage, safetensors: bool) -> None:
    state = {"a": torch.arange(4.0), "b": torch.arange(3.0)}
    old = make_shard_index([state], metadata={"epoch": 1}, safetensors=safetensors)
    save_shard_index(old, storage, _index_name(safetensors))
    metadata = load_shard_index(storage, _index_name(safetensors))["metadata"]
    bigger = {**state, "c": torch.arange(5.0)}
    index = make_shard_index([bigger], metadata=metadata, safetensors=safetensors)
    assert index["metadata"] == {"total_size": 48, "epoch": 1}
    save_sharded_checkpoint(storage, index, bigger, safetensors=safetensors)
    save_shard_index(index, storage, _index_name(safetensors))
    loaded = load_checkpoint(storage)
    assert loaded is not None and loaded.keys() == bigger.keys()
    for name, tensor in bigger.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


@FORMATS
def test_param_sharing_metadata_is_published_exactly_as_given(storage: Storage, safetensors: bool) -> None:
    # Groups may name tensors this save does not hold (another stage's, a dropped head).
    sharing = [["emb.weight", "head.weight"], ["other.weight", "absent.weight"]]
    model = _Tied(tie=True)
    save_checkpoint(storage, model, safetensors=safetensors, param_sharing_metadata=sharing)
    index = load_shard_index(storage, _index_name(safetensors))
    assert index["metadata"]["param_sharing"] == sharing
    assert "head.weight" not in index["weight_map"]
    target = _Tied(tie=False)
    load_checkpoint(storage, target, strict=True)
    assert target.head.weight is target.emb.weight
    torch.testing.assert_close(target.emb.weight, model.emb.weight, rtol=0, atol=0)
