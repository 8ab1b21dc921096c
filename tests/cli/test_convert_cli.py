"""``ckptio convert PATH DST --to safetensors|bin``: weights between the two Hugging Face formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_export_cli import (  # the exported directory's helpers
    _one_error_line,
    _same,
    _tensors,
)

import ckptio
from ckptio.cli import main
from ckptio.storage import Storage, open_storage


def _checkpoint(url: str, options: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8))
    cfg = ckptio.CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=3000)
    path = ckptio.CheckpointManager(cfg, None, model=model).save_checkpoint()
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bin_tensors(storage: Storage, tmp_path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in storage.list(""):
        if name.endswith(".bin"):
            (tmp_path / name).write_bytes(storage.read_bytes(name))
            tensors.update(torch.load(tmp_path / name, weights_only=True))
    return tensors


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_convert_to_bin_and_back(backend_url: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts = ["--storage-options", json.dumps(backend_url.storage_options)]
    path, state = _checkpoint(backend_url.url, backend_url.storage_options)
    bins, back = f"{backend_url.url}/bin", f"{backend_url.url}/back"

    assert main([*opts, "convert", path, bins, "--to", "bin", "--max-shard-size", "4KB"]) == 0
    assert main([*opts, "convert", bins, back, "--to", "safetensors", "--progress"]) == 0

    out, err = capsys.readouterr()
    assert out.startswith("converted 3 files") and f"to {bins} (bin)" in out and f"to {back} (safetensors)" in out
    assert "convert" in err  # the forced progress bar
    bin_storage = open_storage(bins, **backend_url.storage_options)
    index = json.loads(bin_storage.read_bytes("pytorch_model.bin.index.json"))
    assert len(set(index["weight_map"].values())) == 2
    assert _same(state, _bin_tensors(bin_storage, tmp_path))
    back_storage = open_storage(back, **backend_url.storage_options)
    assert back_storage.list("") == ["model.safetensors"]
    assert _same(state, _tensors(back_storage))


def test_convert_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _checkpoint(str(tmp_path / "run"), {})
    full = tmp_path / "full"
    full.mkdir()
    (full / "README.md").write_text("mine")
    assert main(["convert", path, str(tmp_path / "out"), "--to", "onnx"]) == 2  # a usage error
    assert "'onnx'" in _one_error_line(capsys.readouterr().err)
    cases = [
        (
            [str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "bin"],
            str(tmp_path / "missing"),
        ),
        ([path, str(full), "--to", "bin"], "--overwrite"),
    ]
    for argv, expected in cases:
        assert main(["convert", *argv]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert expected in line, line
    assert not (tmp_path / "out").exists() and [p.name for p in full.iterdir()] == ["README.md"]

    assert main(["convert", path, str(full), "--to", "bin", "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in full.iterdir()) == ["README.md", "pytorch_model.bin"]
