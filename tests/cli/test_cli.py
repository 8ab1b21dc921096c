"""The ``ckptio`` command line on every storage backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio._version import __version__
from ckptio.checkpoint import IN_PROGRESS_NAME, MANIFEST_NAME
from ckptio.cli import copy_order, format_size, main
from ckptio.format import weight_files
from ckptio.storage import open_storage


def _manager(url: str, options: dict[str, Any], **config: Any) -> ckptio.CheckpointManager:
    torch.manual_seed(0)
    cfg = ckptio.CheckpointConfig(output_dir=url, storage_options=options, **config)
    return ckptio.CheckpointManager(cfg, None, model=torch.nn.Linear(4, 4))


def _run(capsys: pytest.CaptureFixture[str], options: dict[str, Any], *args: str) -> tuple[int, str, str]:
    code = main(["--storage-options", json.dumps(options), *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckptio: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_ls_shows_complete_and_incomplete(backend_url: Any, capsys: pytest.CaptureFixture[str]) -> None:
    manager = _manager(backend_url.url, backend_url.storage_options)
    manager.save_checkpoint()
    manager.save_checkpoint()
    storage = open_storage(backend_url.url, **backend_url.storage_options)
    storage.write_bytes(f"checkpoints/checkpoint-9/{IN_PROGRESS_NAME}", b"{}")

    code, out, _ = _run(capsys, backend_url.storage_options, "ls", backend_url.url)

    assert code == 0
    rows = [line.split("\t") for line in out.strip().splitlines()]
    assert sorted((r[0], r[1], r[3]) for r in rows) == [
        ("checkpoint-1", "1", "complete"),
        ("checkpoint-2", "2", "complete"),
        ("checkpoint-9", "9", "incomplete"),
    ]
    sizes = {r[0]: r[2] for r in rows}
    assert sizes["checkpoint-9"] == "-"
    assert sizes["checkpoint-1"].endswith(" B") or sizes["checkpoint-1"].endswith("KiB")


def test_latest_and_none(backend_url: Any, capsys: pytest.CaptureFixture[str]) -> None:
    opts = backend_url.storage_options
    code, out, err = _run(capsys, opts, "latest", backend_url.url)
    assert (code, out) == (1, "")
    assert "no complete checkpoint" in _one_error_line(err)

    manager = _manager(backend_url.url, opts)
    manager.save_checkpoint()
    second = manager.save_checkpoint()
    code, out, _ = _run(capsys, opts, "latest", backend_url.url)
    assert (code, out.strip()) == (0, second)


def test_verify_ok_then_corrupt_byte(backend_url: Any, capsys: pytest.CaptureFixture[str]) -> None:
    opts = backend_url.storage_options
    path = _manager(backend_url.url, opts).save_checkpoint()
    code, out, err = _run(capsys, opts, "verify", path)
    assert (code, err) == (0, "")
    assert out.startswith("ok: ")

    storage = open_storage(path, **opts)
    shard = [f for f in weight_files(storage) or [] if f.endswith(".safetensors")][0]
    data = bytearray(storage.read_bytes(shard))
    data[-1] ^= 0xFF  # same size, different content
    storage.write_bytes(shard, bytes(data))
    code, out, err = _run(capsys, opts, "verify", path)
    assert code == 1
    assert storage.url_of(shard) in out and "CRC32C" in out
    _one_error_line(err)


def test_inspect_lists_tensors_and_manifest(backend_url: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = _manager(backend_url.url, backend_url.storage_options).save_checkpoint()
    code, out, _ = _run(capsys, backend_url.storage_options, "inspect", path)
    assert code == 0
    assert ": complete" in out.splitlines()[0]
    assert "checkpoint_id: 1" in out
    tensors = sorted(tuple(line.split("\t")[:3]) for line in out.splitlines() if line.startswith("  ") and "\t" in line)
    assert ("  bias", "float32", "[4]") in tensors
    assert ("  weight", "float32", "[4, 4]") in tensors


def test_inspect_sharded_bin_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    ckptio.save_checkpoint(str(tmp_path), model, safetensors=False, max_shard_size=300)
    code, out, _ = _run(capsys, {}, "inspect", str(tmp_path))
    assert code == 0
    names = sorted(line.split("\t")[0].strip() for line in out.splitlines() if line.startswith("  ") and "\t" in line)
    assert names == ["0.bias", "0.weight", "1.bias", "1.weight"]


def test_cp_between_backends_then_verify_and_load(
    backend_url: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = backend_url.storage_options
    manager = _manager(backend_url.url, opts)
    source = manager.save_checkpoint()
    copy = str(tmp_path / "copy")

    code, out, err = _run(capsys, opts, "cp", source, copy)
    assert code == 0, err
    assert "copied" in out
    assert _run(capsys, {}, "verify", copy)[0] == 0
    model = torch.nn.Linear(4, 4)
    assert not torch.equal(model.weight, manager.model.weight)  # type: ignore[union-attr]
    ckptio.load_checkpoint(copy, model)
    assert torch.equal(model.weight, manager.model.weight)  # type: ignore[union-attr]

    code, _, err = _run(capsys, opts, "cp", source, copy)
    assert code == 1
    assert "--overwrite" in _one_error_line(err)
    Path(copy, "stale.bin").write_bytes(b"x")
    code, _, err = _run(capsys, opts, "cp", "--overwrite", source, copy)
    assert code == 0, err
    assert not Path(copy, "stale.bin").exists()
    assert _run(capsys, {}, "verify", copy)[0] == 0


def test_cp_refuses_incomplete_source(backend_url: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts = backend_url.storage_options
    source = _manager(backend_url.url, opts).save_checkpoint()
    open_storage(source, **opts).delete(MANIFEST_NAME)
    open_storage(source, **opts).write_bytes(IN_PROGRESS_NAME, b"{}")
    copy = tmp_path / "copy"

    code, out, err = _run(capsys, opts, "cp", source, str(copy))

    assert (code, out) == (1, "")
    assert "not a complete checkpoint" in _one_error_line(err)
    assert not copy.exists()


def test_prune_keeps_newest(backend_url: Any, capsys: pytest.CaptureFixture[str]) -> None:
    opts = backend_url.storage_options
    manager = _manager(backend_url.url, opts)
    for _ in range(3):
        manager.save_checkpoint()
    code, out, _ = _run(capsys, opts, "prune", backend_url.url, "--keep", "1")
    assert (code, out.split()) == (0, ["checkpoint-1", "checkpoint-2"])
    names = [e.name for e in ckptio.checkpoint.list_checkpoints(backend_url.url, storage_options=opts)]
    assert names == ["checkpoint-3"]


def test_prune_keep_zero_is_one_line_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _manager(str(tmp_path), {}).save_checkpoint()
    code, out, err = _run(capsys, {}, "prune", str(tmp_path), "--keep", "0")
    assert (code, out) == (2, "")
    assert "--keep" in _one_error_line(err)
    assert (tmp_path / "checkpoints" / "checkpoint-1" / MANIFEST_NAME).exists()


def test_debug_prints_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "latest", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--storage-options", "{not json", "ls", "x"], ["--storage-options", "[1]", "ls", "x"], ["frobnicate"], []],
)
def test_bad_command_lines_are_one_line_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err)


def test_copy_order_publishes_manifest_last() -> None:
    keys = [MANIFEST_NAME, "model.safetensors.index.json", "a.safetensors", IN_PROGRESS_NAME, "z/state.pt"]
    assert copy_order(keys) == ["a.safetensors", "z/state.pt", "model.safetensors.index.json", MANIFEST_NAME]


def test_format_size() -> None:
    assert [format_size(n) for n in (None, 0, 1023, 1536, 3 * 2**20)] == ["-", "0 B", "1023 B", "1.5 KiB", "3.0 MiB"]


def test_python_m_ckptio_version() -> None:
    done = subprocess.run([sys.executable, "-m", "ckptio", "--version"], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, f"ckptio {__version__}")
