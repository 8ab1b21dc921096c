"""``write_shards(files=...)``: a rank writes only its share of one index's shards."""

from __future__ import annotations

import uuid

import pytest
import torch

from ckptio.errors import InvalidArgumentError
from ckptio.format import make_shard_index
from ckptio.format.writer import write_shards
from ckptio.storage import open_storage


def test_only_the_named_shards_are_written() -> None:
    storage = open_storage(f"memory://ckptio-test/{uuid.uuid4().hex}")
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(4)}
    index = make_shard_index([state], safetensors=True, max_shard_size=64)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 4
    records = write_shards(storage, index, state, safetensors=True, files=files[1:3])
    assert sorted(r.path for r in records) == files[1:3]
    assert sorted(storage.list("")) == files[1:3]
    assert write_shards(storage, index, state, files=[]) == []
    storage.delete_prefix("")


def test_a_file_the_index_does_not_give_these_tensors_is_refused_before_writing() -> None:
    storage = open_storage(f"memory://ckptio-test/{uuid.uuid4().hex}")
    state = {"a": torch.zeros(16), "b": torch.ones(16)}
    index = make_shard_index([state], safetensors=True, max_shard_size=64)
    first = sorted(set(index["weight_map"].values()))[0]
    with pytest.raises(InvalidArgumentError, match="model-00009-of-00009.safetensors"):
        write_shards(storage, index, state, files=[first, "model-00009-of-00009.safetensors"])
    assert storage.list("") == []
