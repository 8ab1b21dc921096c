"""The shard planner: pure, sizes only, Hugging Face names and index schema."""

from __future__ import annotations

import pytest
import torch

from ckptio.errors import InvalidArgumentError
from ckptio.format import make_shard_index
from ckptio.format.constants import SHARD_NAME_PATTERN


def _sd(*sizes: int, prefix: str = "t", device: str = "cpu") -> dict[str, torch.Tensor]:
    """float32 tensors of the given byte sizes."""
    return {f"{prefix}{i}": torch.empty(size // 4, device=device) for i, size in enumerate(sizes)}


def test_packs_in_order_and_starts_a_new_shard_on_overflow() -> None:
    index = make_shard_index([_sd(40, 40, 40, 40)], max_shard_size=100, safetensors=True)
    assert index["weight_map"] == {
        "t0": "model-00001-of-00002.safetensors",
        "t1": "model-00001-of-00002.safetensors",
        "t2": "model-00002-of-00002.safetensors",
        "t3": "model-00002-of-00002.safetensors",
    }
    assert index["metadata"] == {"total_size": 160}


def test_a_tensor_bigger_than_the_limit_gets_its_own_shard() -> None:
    # As huggingface_hub does: the big tensor goes alone, the shard being filled goes on.
    index = make_shard_index([_sd(40, 400, 40)], max_shard_size=100)
    assert index["weight_map"] == {
        "t0": "pytorch_model-00002-of-00002.bin",
        "t1": "pytorch_model-00001-of-00002.bin",
        "t2": "pytorch_model-00002-of-00002.bin",
    }


def test_one_shard_is_still_a_numbered_shard() -> None:
    index = make_shard_index([_sd(8, 8)], safetensors=True)
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


def test_each_stage_gets_its_own_shards_numbered_after_the_previous() -> None:
    stages = [_sd(60, 60, prefix="a"), _sd(10, prefix="b"), _sd(60, 60, 60, prefix="c")]
    index = make_shard_index(stages, max_shard_size=100, safetensors=True)
    by_stage = [{index["weight_map"][n] for n in stage} for stage in stages]
    assert by_stage == [
        {"model-00001-of-00006.safetensors", "model-00002-of-00006.safetensors"},
        {"model-00003-of-00006.safetensors"},
        {"model-00004-of-00006.safetensors", "model-00005-of-00006.safetensors", "model-00006-of-00006.safetensors"},
    ]
    assert all(SHARD_NAME_PATTERN.match(f) for f in index["weight_map"].values())


def test_plans_from_meta_tensors_without_touching_data() -> None:
    real = make_shard_index([_sd(40, 400, 40)], max_shard_size=100)
    meta = make_shard_index([_sd(40, 400, 40, device="meta")], max_shard_size=100)
    assert meta == real


def test_tied_aliases_are_stored_once_and_recorded() -> None:
    shared = torch.ones(10)
    sd = {"emb": shared, "mid": torch.ones(3), "head": shared}
    index = make_shard_index([sd], param_sharing_metadata=[["emb", "head"]], metadata={"step": 3})
    assert list(index["weight_map"]) == ["emb", "mid"]
    assert index["metadata"] == {"total_size": 52, "step": 3, "param_sharing": [["emb", "head"]]}


def test_sharing_groups_are_recorded_as_given() -> None:
    # Members absent from the state dicts are kept in the record; only present names are stored.
    sd = {"head": torch.ones(10), "x": torch.ones(1), "z": torch.ones(1)}
    sharing = [["emb", "head"], ["x", "y", "z"]]
    index = make_shard_index([sd], param_sharing_metadata=sharing)
    assert sorted(index["weight_map"]) == ["head", "x"]
    assert index["metadata"] == {"total_size": 44, "param_sharing": [["emb", "head"], ["x", "y", "z"]]}


def test_sharing_groups_of_names_not_saved_are_recorded() -> None:
    sharing = [["embedding.weight", "lm_head.weight"]]
    index = make_shard_index([{"w": torch.ones(4)}], param_sharing_metadata=sharing)
    assert index["metadata"]["param_sharing"] == sharing
    assert index["weight_map"] == {"w": "pytorch_model-00001-of-00001.bin"}


def test_a_loaded_index_metadata_is_accepted_and_its_own_keys_recomputed() -> None:
    shared = torch.ones(10)
    old = make_shard_index(
        [{"emb": shared, "head": shared}], metadata={"step": 3}, param_sharing_metadata=[["emb", "head"]]
    )
    assert old["metadata"] == {"total_size": 40, "step": 3, "param_sharing": [["emb", "head"]]}
    # A new save of untied tensors with the old metadata: both keys describe the new save.
    new = make_shard_index([{"emb": torch.ones(2), "head": torch.ones(3)}], metadata=old["metadata"])
    assert new["metadata"] == {"total_size": 20, "step": 3}
    assert old["metadata"] == {"total_size": 40, "step": 3, "param_sharing": [["emb", "head"]]}  # not modified


def test_empty_model_plans_no_shards() -> None:
    assert make_shard_index([{}]) == {"metadata": {"total_size": 0}, "weight_map": {}}


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([_sd(4), _sd(4)],), {}, "more than one state dict"),
        (([{"a": [1, 2]}],), {}, "expected a tensor"),
        (([_sd(4)],), {"max_shard_size": 0}, "positive"),
        (([_sd(4)],), {"metadata": {"bad": object()}}, "JSON"),
        (([_sd(4)],), {"param_sharing_metadata": [["only-one"]]}, "groups of two or more"),
        ((_sd(4),), {}, "list of state dicts"),
    ],
    ids=["duplicate-name", "not-a-tensor", "zero-limit", "metadata-not-json", "bad-groups", "dict"],
)
def test_bad_input_is_refused(args: tuple[object, ...], kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        make_shard_index(*args, **kwargs)  # type: ignore[arg-type]
