"""The public names and signatures of ckptio.format are the seed design's (SPEC section 2)."""

from __future__ import annotations

import inspect

import pytest

import ckptio.format as fmt

EMPTY = inspect.Parameter.empty

#: name -> the seed design's positional parameters and defaults, in order.
SEED = {
    "save_checkpoint": [
        ("output_dir", EMPTY),
        ("module", EMPTY),
        ("metadata", None),
        ("safetensors", False),
        ("max_shard_size", 2**31),
        ("debug", False),
        ("include_param_sharing", True),
        ("param_sharing_metadata", None),
    ],
    "load_checkpoint": [
        ("model_dir", EMPTY),
        ("module", None),
        ("device", "cpu"),
        ("strict", True),
        ("assign", False),
        ("keys", None),
    ],
    "make_shard_index": [
        ("state_dictionaries", EMPTY),
        ("metadata", None),
        ("safetensors", False),
        ("max_shard_size", 2**31),
        ("param_sharing_metadata", None),
    ],
    "save_shard_index": [("shard_index", EMPTY), ("output_dir", EMPTY), ("index_name", EMPTY)],
    "save_sharded_checkpoint": [
        ("output_dir", EMPTY),
        ("shard_index", EMPTY),
        ("module", EMPTY),
        ("safetensors", False),
        ("debug", False),
    ],
    "load_shard_index": [("model_dir", EMPTY), ("index_name", EMPTY)],
    "load_sharded_checkpoint": [
        ("model_dir", EMPTY),
        ("shard_index", EMPTY),
        ("module", None),
        ("device", "cpu"),
        ("safetensors", False),
        ("strict", True),
        ("assign", False),
        ("debug", False),
        ("keys", None),
    ],
    "get_checkpoint_metadata": [("model_dir", EMPTY)],
    "create_sharing_metadata": [("module", EMPTY)],
    "retie_parameters": [("module", EMPTY), ("sharing_metadata", EMPTY)],
}
#: Functions that take a directory also take ``storage_options`` as a keyword.
WITH_STORAGE = {name for name, params in SEED.items() if params[0][0] in ("output_dir", "model_dir")} | {
    "save_shard_index"
}


@pytest.mark.parametrize("name", sorted(SEED))
def test_seed_signature(name: str) -> None:
    params = inspect.signature(getattr(fmt, name)).parameters.values()
    positional = [(p.name, p.default) for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == SEED[name]
    keyword_only = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == ({"storage_options": None} if name in WITH_STORAGE else {})


def test_constants_and_meta() -> None:
    assert (fmt.WEIGHTS_NAME, fmt.WEIGHTS_INDEX_NAME) == ("pytorch_model.bin", "pytorch_model.bin.index.json")
    assert (fmt.SAFE_WEIGHTS_NAME, fmt.SAFE_WEIGHTS_INDEX_NAME) == ("model.safetensors", "model.safetensors.index.json")
    assert [f.name for f in fmt.CheckpointMeta.__dataclass_fields__.values()] == [
        "file_name",
        "is_index",
        "safetensors",
    ]


def test_all_lists_exactly_the_public_api() -> None:
    public = {
        name
        for name, value in vars(fmt).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"  # __future__
    }
    assert set(fmt.__all__) == public
    assert set(SEED) | {"write_model_weights", "read_model_weights", "weight_files"} <= set(fmt.__all__)
