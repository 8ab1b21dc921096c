"""Files that documentation samples read, made before the sample runs (``<!-- docs-test: setup=NAME -->``).

Each function takes the page's working directory and writes what a reader of
that page would already have on disk. Nothing here is shown in the docs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["hf_trainer_checkpoint", "seed_checkpoint", "tiny_gpt2"]


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """The tiny GPT-2 the migration page uses (built offline from a config)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000))


def hf_trainer_checkpoint(cwd: Path) -> None:
    """``hf-run/checkpoint-500/``: the files ``transformers.Trainer`` writes for a single-process run.

    Trainer itself needs ``accelerate``, which the test environment lacks, so
    its files are written here the way it writes them: ``save_pretrained``
    (``config.json``, ``generation_config.json``, ``model.safetensors``), then
    ``optimizer.pt`` and ``scheduler.pt`` (``torch.save`` of the state dicts),
    ``rng_state.pth``, ``trainer_state.json`` and ``training_args.bin``.
    """
    folder = cwd / "hf-run" / "checkpoint-500"
    model = tiny_gpt2(seed=500)
    model.save_pretrained(str(folder))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.arange(8).reshape(1, 8), labels=torch.arange(8).reshape(1, 8)).loss.backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save({"python": None, "numpy": None, "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500, "epoch": 1.0, "log_history": []}))
    torch.save({"output_dir": "hf-run"}, folder / "training_args.bin")


def seed_checkpoint(cwd: Path) -> None:
    """``seed-run/checkpoints/checkpoint-10/``: a checkpoint as the seed design's manager wrote it.

    Weights as Hugging Face shards, one component file, and the seed's
    ``checkpoint_manifest.json``: the seed's fields only (no ``format_version``,
    no ``files``), a naive timestamp.
    """
    import ckptio

    folder = cwd / "seed-run" / "checkpoints" / "checkpoint-10"
    torch.manual_seed(10)
    model = torch.nn.Linear(16, 4)
    ckptio.save_checkpoint(str(folder), model, safetensors=True)
    torch.save(torch.optim.AdamW(model.parameters()).state_dict(), folder / "optimizer_state.pt")
    manifest = {
        "checkpoint_path": str(folder),
        "world_size": 1,
        "timestamp": "2025-01-24T10:30:00",
        "components": {
            "optimizer": {
                "key": "optimizer",
                "sharing_pattern": "global",
                "ranks": [0],
                "replicated_across": None,
                "group_name": None,
                "size_bytes": (folder / "optimizer_state.pt").stat().st_size,
                "checksum": None,
                "metadata": {},
            }
        },
        "training_args_hash": None,
        "forgather_version": "0.1.0",
        "pytorch_version": torch.__version__,
        "metadata": {},
    }
    (folder / "checkpoint_manifest.json").write_text(json.dumps(manifest, indent=2))
