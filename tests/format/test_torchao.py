"""torchao-quantized checkpoints: saved as PyTorch shards, loaded with weights_only=True.

safetensors holds plain tensors only, so quantized weights (tensor subclasses)
go to ``.bin`` shards; torchao registers its tensor types as safe globals, so
``torch.load(weights_only=True)`` reads them back. Skipped where torchao is not
installed or cannot quantize on this machine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckptio.errors import InvalidArgumentError
from ckptio.format import load_checkpoint, save_checkpoint
from ckptio.storage import Storage

torchao_quantization = pytest.importorskip("torchao.quantization", reason="torchao is not installed")

INPUT = torch.linspace(-2, 2, 4 * 64).reshape(4, 64)


def _quantized(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    try:
        torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
    except (RuntimeError, NotImplementedError, AttributeError) as exc:  # pragma: no cover - platform dependent
        pytest.skip(f"torchao cannot quantize on this machine: {exc}")
    return model


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_quantized_checkpoint_loads_into_a_quantized_module(storage: Storage, assign: bool) -> None:
    saved, target = _quantized(0), _quantized(1)
    assert type(saved[0].weight) is not torch.Tensor and type(saved[0].weight) is not nn.Parameter
    with torch.no_grad():
        expected = saved(INPUT)
        assert not torch.equal(target(INPUT), expected)
    save_checkpoint(storage, saved, safetensors=False, max_shard_size=4096)
    load_checkpoint(storage, target, assign=assign)
    assert type(target[0].weight) is type(saved[0].weight)
    with torch.no_grad():
        assert torch.equal(target(INPUT), expected)


def test_safetensors_refuses_quantized_weights_with_a_hint(storage: Storage) -> None:
    with pytest.raises(InvalidArgumentError, match=r"safetensors=False"):
        save_checkpoint(storage, _quantized(0), safetensors=True)
    assert storage.list() == []
