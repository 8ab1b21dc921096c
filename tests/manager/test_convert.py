"""convert_checkpoint: model weights between safetensors and PyTorch ``.bin`` Hugging Face directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from export_helpers import differing, load_exported  # noqa: E402

from ckptio import CheckpointConfig, CheckpointManager  # noqa: E402
from ckptio.errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointNotFoundError,
    InvalidArgumentError,
)
from ckptio.format import read_model_weights  # noqa: E402
from ckptio.manager.convert import convert_checkpoint  # noqa: E402
from ckptio.storage import ProgressEvent, Storage, open_storage  # noqa: E402

pytestmark = pytest.mark.timeout(300)


class Tied(nn.Module):
    """Float32, bfloat16 and int64 state, and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 24)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight
        self.low = nn.Parameter(torch.randn(7, 5).to(torch.bfloat16))
        self.register_buffer("steps", torch.arange(6))


def _tied() -> Tied:
    torch.manual_seed(0)
    return Tied()


def _download(storage: Storage, local: Path) -> Path:
    local.mkdir(parents=True, exist_ok=True)
    for name in storage.list(""):
        (local / name).write_bytes(storage.read_bytes(name))
    return local


def _load_bins(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``.bin`` files of a local directory, with plain ``torch.load(weights_only=True)``."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.bin")):
        loaded = torch.load(shard, weights_only=True)
        assert not set(loaded) & set(tensors), shard
        tensors.update(loaded)
    return tensors


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_round_trip_safetensors_bin_safetensors_is_bit_exact(backend_url: Any, tmp_path: Path) -> None:
    opts = backend_url.storage_options
    model = _tied()
    config = CheckpointConfig(output_dir=backend_url.url, storage_options=opts, max_shard_size=2000)
    path = CheckpointManager(config, None, model).save_checkpoint()
    st1, bins, st2 = (open_storage(f"{backend_url.url}/{name}", **opts) for name in ("st1", "bin", "st2"))
    events: list[ProgressEvent] = []

    convert_checkpoint(path, st1, to="safetensors", storage_options=opts, max_shard_size=3000)
    records = convert_checkpoint(st1, bins, to="bin", max_shard_size=3000, progress=events.append)
    convert_checkpoint(bins, st2, to="safetensors", max_shard_size=3000)

    index = json.loads(bins.read_bytes("pytorch_model.bin.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and [r.path for r in records] == [
        *shards,
        "pytorch_model.bin.index.json",
    ]
    assert sorted(bins.list("")) == sorted([*shards, "pytorch_model.bin.index.json"])
    assert index["metadata"]["param_sharing"] == [["emb.weight", "head.weight"]]
    expected = {k: v for k, v in model.state_dict().items() if k != "head.weight"}  # the alias is stored once
    assert differing(expected, _load_bins(_download(bins, tmp_path / "bin"))) == []
    assert sorted(st1.list("")) == sorted(st2.list(""))
    for name in st1.list(""):  # safetensors -> bin -> safetensors gives back the same files, byte for byte
        assert st1.read_bytes(name) == st2.read_bytes(name), name
    assert differing(expected, load_exported(_download(st2, tmp_path / "st2"))) == []
    fresh = Tied()
    read_model_weights(bins, fresh)  # ckptio reads the .bin directory back, ties included
    assert fresh.head.weight is fresh.emb.weight and differing(model.state_dict(), fresh.state_dict()) == []
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == sum(r.size for r in records)
    assert {(e.operation, e.url, e.bytes_total) for e in events} == {("convert", bins.url, None)}


def test_hugging_face_directory_converts_both_ways_and_loads_with_from_pretrained(
    tmp_path: Path,
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 8}')

    convert_checkpoint(tmp_path / "hf", tmp_path / "bin", to="bin", max_shard_size=40_000)
    convert_checkpoint(tmp_path / "bin", tmp_path / "st", to="safetensors")

    names = {p.name for p in (tmp_path / "bin").iterdir()}
    assert {
        "config.json",
        "tokenizer_config.json",
        "pytorch_model.bin.index.json",
    } <= names
    assert not any(n.endswith(".safetensors") for n in names)
    tokens = torch.randint(0, 64, (2, 8))
    for converted in ("bin", "st"):
        loaded = GPT2LMHeadModel.from_pretrained(tmp_path / converted).eval()
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
        assert differing(model.state_dict(), loaded.state_dict()) == []
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    from safetensors.torch import load_file

    assert (
        differing(
            load_file(tmp_path / "hf" / "model.safetensors"),
            load_exported(tmp_path / "st"),
        )
        == []
    )


def test_tied_tensors_of_a_plain_bin_file_are_stored_once(tmp_path: Path) -> None:
    model = _tied()
    (tmp_path / "src").mkdir()
    torch.save(model.state_dict(), tmp_path / "src" / "pytorch_model.bin")  # as older transformers wrote it

    convert_checkpoint(tmp_path / "src", tmp_path / "st", to="safetensors", max_shard_size=3000)

    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["param_sharing"] == [["emb.weight", "head.weight"]]
    assert "head.weight" not in index["weight_map"]
    expected = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    assert differing(expected, load_exported(tmp_path / "st")) == []


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    model = _tied()
    (tmp_path / "src").mkdir()
    torch.save(model.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")

    with pytest.raises(InvalidArgumentError, match="'onnx'"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", to="onnx")
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path / "nowhere")):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out", to="bin")
    with pytest.raises(CheckpointExistsError, match=str(tmp_path / "full")):
        convert_checkpoint(tmp_path / "src", tmp_path / "full", to="safetensors")
    with pytest.raises(InvalidArgumentError, match="overlap"):
        convert_checkpoint(tmp_path / "src", tmp_path / "src" / "out", to="safetensors")
    assert not (tmp_path / "out").exists() and not (tmp_path / "src" / "out").exists()
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]

    convert_checkpoint(tmp_path / "src", tmp_path / "full", to="safetensors", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "model.safetensors",
        "notes.txt",
    ]
