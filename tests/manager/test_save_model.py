"""save_model writes a directory that transformers' from_pretrained opens."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptio import CheckpointConfig, CheckpointManager


def test_save_model_opens_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000)).eval()
    manager = CheckpointManager(CheckpointConfig(output_dir=str(tmp_path / "run"), max_shard_size=200_000), None, model)
    target = tmp_path / "final"
    manager.save_model(str(target))
    assert (target / "config.json").exists() and (target / "model.safetensors.index.json").exists()

    loaded = GPT2LMHeadModel.from_pretrained(target).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    tokens = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
