"""``--json`` on ``ls``, ``inspect``, ``verify`` and ``latest``, and the exit codes 0, 1 and 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptio
from ckptio.checkpoint import IN_PROGRESS_NAME, MANIFEST_NAME, read_manifest
from ckptio.cli import main
from ckptio.format import weight_files
from ckptio.storage import open_storage


def _manager(url: str, options: dict[str, Any]) -> ckptio.CheckpointManager:
    torch.manual_seed(0)
    cfg = ckptio.CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=600)
    return ckptio.CheckpointManager(cfg, None, model=torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)))


def _run_json(capsys: pytest.CaptureFixture[str], options: dict[str, Any], *args: str) -> tuple[int, Any, str]:
    code = main(["--storage-options", json.dumps(options), *args, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptio: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_ls_json_lists_every_checkpoint_with_bytes_and_status(
    backend_url: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = backend_url.storage_options
    manager = _manager(backend_url.url, opts)
    first, second = manager.save_checkpoint(), manager.save_checkpoint()
    open_storage(backend_url.url, **opts).write_bytes(f"checkpoints/checkpoint-9/{IN_PROGRESS_NAME}", b"{}")

    code, doc, err = _run_json(capsys, opts, "ls", backend_url.url)

    assert (code, err) == (0, "")
    assert doc["url"] == backend_url.url
    rows = {row["name"]: row for row in doc["checkpoints"]}
    assert sorted(rows) == ["checkpoint-1", "checkpoint-2", "checkpoint-9"]
    for name, path in (("checkpoint-1", first), ("checkpoint-2", second)):
        manifest = read_manifest(open_storage(path, **opts))
        assert rows[name]["size_bytes"] == manifest.total_size > 0
        assert (rows[name]["status"], rows[name]["complete"]) == ("complete", True)
        assert rows[name]["timestamp"] == manifest.timestamp
        assert rows[name]["checkpoint_id"] == int(name.split("-")[1])
    assert rows["checkpoint-9"] | {"url": None} == {
        "name": "checkpoint-9",
        "checkpoint_id": 9,
        "url": None,
        "status": "incomplete",
        "complete": False,
        "size_bytes": None,
        "timestamp": None,
        "error": None,
    }


def test_ls_json_of_an_empty_run_is_an_empty_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err = _run_json(capsys, {}, "ls", str(tmp_path))
    assert (code, doc, err) == (0, {"url": str(tmp_path), "checkpoints": []}, "")


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_inspect_json_carries_manifest_files_and_tensors(backend_url: Any, capsys: pytest.CaptureFixture[str]) -> None:
    opts = backend_url.storage_options
    path = _manager(backend_url.url, opts).save_checkpoint()
    storage = open_storage(path, **opts)

    code, doc, _ = _run_json(capsys, opts, "inspect", path)

    assert code == 0
    assert (doc["status"], doc["problems"]) == ("complete", [])
    manifest = doc["manifest"]
    sizes = {o.key: o.size for o in storage.list_objects("")}
    assert {f["path"]: f["size_bytes"] for f in manifest["files"]} == {k: s for k, s in sizes.items() if k != MANIFEST_NAME}
    assert manifest["size_bytes"] == sum(f["size_bytes"] for f in manifest["files"])
    assert (manifest["checkpoint_id"], manifest["world_size"], manifest["file_count"]) == (1, 1, len(manifest["files"]))
    assert all(len(f["crc32c"]) == 8 for f in manifest["files"])
    weights = doc["weights"]
    assert weights["files"] == weight_files(storage)
    tensors = {t["name"]: (t["dtype"], t["shape"]) for t in weights["tensors"]}
    assert tensors == {
        "0.weight": ("float32", [16, 16]),
        "0.bias": ("float32", [16]),
        "1.weight": ("float32", [4, 16]),
        "1.bias": ("float32", [4]),
    }
    assert weights["files"][0].endswith(".index.json") and len(weights["files"]) > 2
    assert {t["file"] for t in weights["tensors"]} == set(weights["files"][1:])


def test_inspect_json_of_a_bin_model_dir_has_no_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckptio.save_checkpoint(str(tmp_path), torch.nn.Linear(3, 2), safetensors=False, max_shard_size=20)
    code, doc, _ = _run_json(capsys, {}, "inspect", str(tmp_path))
    assert (code, doc["status"], doc["manifest"]) == (0, "complete", None)
    assert sorted(t["name"] for t in doc["weights"]["tensors"]) == ["bias", "weight"]
    assert {t["dtype"] for t in doc["weights"]["tensors"]} == {None}  # named by the index, not unpickled


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_verify_json_reports_ok_then_problems_with_exit_1(backend_url: Any, capsys: pytest.CaptureFixture[str]) -> None:
    opts = backend_url.storage_options
    path = _manager(backend_url.url, opts).save_checkpoint()
    code, doc, err = _run_json(capsys, opts, "verify", path)
    assert (code, doc, err) == (0, {"url": path, "ok": True, "problems": []}, "")

    storage = open_storage(path, **opts)
    shard = [f for f in weight_files(storage) or [] if f.endswith(".safetensors")][0]
    data = bytearray(storage.read_bytes(shard))
    data[-1] ^= 0xFF
    storage.write_bytes(shard, bytes(data))
    code, doc, err = _run_json(capsys, opts, "verify", path)
    assert (code, doc["url"], doc["ok"]) == (1, path, False)
    assert len(doc["problems"]) == 1 and storage.url_of(shard) in doc["problems"][0] and "CRC32C" in doc["problems"][0]
    assert "1 problem" in _one_error_line(err)


def test_latest_json_and_exit_1_without_a_complete_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc, err = _run_json(capsys, {}, "latest", str(tmp_path))
    assert (code, doc) == (1, {"url": str(tmp_path), "latest": None})
    assert "no complete checkpoint" in _one_error_line(err)

    manager = _manager(str(tmp_path), {})
    manager.save_checkpoint()
    second = manager.save_checkpoint()
    code, doc, err = _run_json(capsys, {}, "latest", str(tmp_path))
    assert (code, doc, err) == (0, {"url": str(tmp_path), "latest": second}, "")


def test_json_is_offered_by_exactly_the_read_only_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("ls", "inspect", "verify", "latest"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--json" in out and '"url"' in out, command
    for command in ("cp", "prune", "export"):
        assert main([command, "--help"]) == 0
        assert "--json" not in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["ls", "{tmp}"], 0),
        (["latest", "{tmp}"], 1),
        (["verify", "{tmp}/missing"], 1),
        (["inspect", "{tmp}/missing", "--json"], 1),
        (["ls"], 2),
        (["ls", "{tmp}", "--bogus"], 2),
        (["frobnicate"], 2),
        (["prune", "{tmp}", "--keep", "none"], 2),
        (["--storage-options", "{{nope", "ls", "{tmp}"], 2),
    ],
)
def test_exit_codes(argv: list[str], code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """0 success, 1 a failure, 2 a usage error; a failure is one line on stderr and no traceback."""
    assert main([a.format(tmp=tmp_path) for a in argv]) == code
    out, err = capsys.readouterr()
    if code:
        _one_error_line(err)
        # Only verify prints (its problems) before failing.
        assert (out != "") == (argv[0] == "verify"), out


def test_python_m_ckptio_exits_2_on_a_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "ckptio", "ls"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert "URL" in _one_error_line(done.stderr)
