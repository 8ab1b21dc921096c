"""``ckptio export CKPT DST``: a checkpoint's model as a Hugging Face safetensors directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

import ckptio
from ckptio.checkpoint import IN_PROGRESS_NAME, MANIFEST_NAME
from ckptio.cli import main
from ckptio.storage import Storage, open_storage

INDEX = "model.safetensors.index.json"


def _checkpoint(url: str, options: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8))
    cfg = ckptio.CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=3000)
    path = ckptio.CheckpointManager(cfg, None, model=model).save_checkpoint()
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tensors(storage: Storage) -> dict[str, torch.Tensor]:
    """Every tensor of the exported directory, each shard parsed by the safetensors library."""
    tensors: dict[str, torch.Tensor] = {}
    for name in storage.list(""):
        if name.endswith(".safetensors"):
            tensors.update(load(storage.read_bytes(name)))
    return tensors


def _same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> bool:
    return expected.keys() == got.keys() and all(
        expected[k].dtype == got[k].dtype and torch.equal(expected[k], got[k]) for k in expected
    )


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptio: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_export_writes_a_sharded_safetensors_directory(backend_url: Any, capsys: pytest.CaptureFixture[str]) -> None:
    opts = backend_url.storage_options
    path, state = _checkpoint(backend_url.url, opts)
    dst = f"{backend_url.url}/hf"

    code = main(["--storage-options", json.dumps(opts), "export", path, dst, "--max-shard-size", "4KB"])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("exported ") and dst in out
    storage = open_storage(dst, **opts)
    index = json.loads(storage.read_bytes(INDEX))
    assert len(set(index["weight_map"].values())) > 1
    assert _same(state, _tensors(storage))


@pytest.mark.parametrize("backend_url", ["s3", "gcs"], indirect=True)
def test_export_to_another_storage_with_dst_storage_options(
    backend_url: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, state = _checkpoint(str(tmp_path / "run"), {})
    dst = f"{backend_url.url}/hf"

    code = main(["export", path, dst, "--dst-storage-options", json.dumps(backend_url.storage_options)])

    out, err = capsys.readouterr()
    assert code == 0, err
    storage = open_storage(dst, **backend_url.storage_options)
    assert sorted(storage.list("")) == ["model.safetensors"]
    assert _same(state, _tensors(storage))
    assert "secret" not in out + err


def test_export_of_an_uncommitted_checkpoint_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = _checkpoint(str(tmp_path / "run"), {})
    (Path(path) / MANIFEST_NAME).unlink()
    (Path(path) / IN_PROGRESS_NAME).write_text("{}")

    code = main(["export", path, str(tmp_path / "hf")])

    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and path in line and "not a committed" in line
    assert not (tmp_path / "hf").exists()


def test_export_overwrites_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, state = _checkpoint(str(tmp_path / "run"), {})
    dst = tmp_path / "hf"
    assert main(["export", path, str(dst), "--max-shard-size", "4096"]) == 0
    before = sorted(p.name for p in dst.iterdir())
    capsys.readouterr()

    assert main(["export", path, str(dst)]) == 1
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in dst.iterdir()) == before

    assert main(["export", path, str(dst), "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors"]
    assert _same(state, _tensors(open_storage(str(dst))))


@pytest.mark.parametrize("size", ["0", "lots", "-5MB"])
def test_export_rejects_a_bad_shard_size(size: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _checkpoint(str(tmp_path / "run"), {})
    assert main(["export", path, str(tmp_path / "hf"), f"--max-shard-size={size}"]) == 2
    assert "--max-shard-size" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "hf").exists()


def test_python_m_ckptio_export(tmp_path: Path) -> None:
    path, state = _checkpoint(str(tmp_path / "run"), {})
    done = subprocess.run(
        [sys.executable, "-m", "ckptio", "export", path, str(tmp_path / "hf")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert _same(state, _tensors(open_storage(str(tmp_path / "hf"))))
