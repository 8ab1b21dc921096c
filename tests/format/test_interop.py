"""Interop with the real Hugging Face clients, both directions, local and in buckets. No network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from safetensors import safe_open

from ckptio.format import (
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    load_checkpoint,
    save_checkpoint,
)
from ckptio.format.index import index_shard_files, read_index
from ckptio.storage import Storage, open_storage

TOKENS = torch.tensor([[1, 17, 400, 999, 3, 3, 250], [0, 5, 6, 7, 8, 9, 10]])


def _gpt2(seed: int) -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _copy(src: Storage, dst: Storage) -> list[str]:
    keys = src.walk()
    for key in keys:
        dst.write_bytes(key, src.read_bytes(key))
    return keys


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_our_sharded_output_loads_with_the_hugging_face_clients(
    backend_url: object, tmp_path: Path, safetensors: bool
) -> None:
    url, opts = backend_url.url, backend_url.storage_options  # type: ignore[attr-defined]
    model, other = _gpt2(0), _gpt2(1)
    assert not torch.equal(_logits(model), _logits(other))
    save_checkpoint(url, model, safetensors=safetensors, max_shard_size=100_000, storage_options=opts)
    local = tmp_path / "copy"
    keys = _copy(open_storage(url, **opts), open_storage(str(local)))  # what `aws s3 cp` would fetch
    assert len([k for k in keys if "-of-" in k]) > 1
    model.config.save_pretrained(str(local))

    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(local)).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight

    result = huggingface_hub.load_torch_model(other, str(local), strict=False, safe=safetensors)
    assert list(result.missing_keys) == ["lm_head.weight"]  # the tied alias, stored once
    assert list(result.unexpected_keys) == []
    torch.testing.assert_close(_logits(other), _logits(model), rtol=0, atol=0)

    if safetensors:
        index = read_index(open_storage(str(local)), SAFE_WEIGHTS_INDEX_NAME)
        state = model.state_dict()
        seen = set()
        for shard in index_shard_files(index):
            with safe_open(str(local / shard), framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    assert torch.equal(f.get_tensor(name), state[name]), name
                    seen.add(name)
        assert seen == set(state) - {"lm_head.weight"}


@pytest.mark.parametrize("max_shard_size", ["100KB", None], ids=["sharded", "single-file"])
def test_save_pretrained_output_loads_with_ckptio(
    backend_url: object, tmp_path: Path, max_shard_size: str | None
) -> None:
    model = _gpt2(0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(tmp_path / "hf"), **kwargs)
    names = os.listdir(tmp_path / "hf")
    assert (SAFE_WEIGHTS_INDEX_NAME in names) == bool(max_shard_size)
    url, opts = backend_url.url, backend_url.storage_options  # type: ignore[attr-defined]
    _copy(open_storage(str(tmp_path / "hf")), open_storage(url, **opts))

    target = _gpt2(1)
    assert not torch.equal(_logits(target), _logits(model))
    load_checkpoint(url, target, strict=True, storage_options=opts)
    torch.testing.assert_close(_logits(target), _logits(model), rtol=0, atol=0)
    assert target.lm_head.weight is target.transformer.wte.weight

    state = load_checkpoint(url, storage_options=opts)
    assert state is not None and "transformer.wte.weight" in state
    assert torch.equal(state["transformer.h.1.mlp.c_fc.weight"], model.transformer.h[1].mlp.c_fc.weight)


def test_untied_gpt2_round_trips_both_heads(storage: Storage) -> None:
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=100, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is not model.transformer.wte.weight
    save_checkpoint(storage, model, safetensors=False)
    assert "lm_head.weight" in read_index(storage, WEIGHTS_INDEX_NAME)["weight_map"]
    torch.manual_seed(1)
    target = transformers.GPT2LMHeadModel(config)
    load_checkpoint(storage, target)
    assert target.lm_head.weight is not target.transformer.wte.weight
    assert torch.equal(target.lm_head.weight, model.lm_head.weight)
