"""Resolving URLs to backends, local-disk specifics, and layering rules."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import fsspec
import pytest

import ckptio.storage
from ckptio.errors import InvalidArgumentError, MissingDependencyError
from ckptio.storage import (
    LocalStorage,
    RetryingStorage,
    join,
    normalize_key,
    open_storage,
)
from ckptio.storage.local import TEMP_PREFIX


def test_local_paths_and_file_urls_get_local_storage(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    by_url = open_storage(f"file://{tmp_path}")
    assert isinstance(by_url, LocalStorage) and by_url.url == str(tmp_path)


def test_object_stores_are_wrapped_in_retries() -> None:
    storage = open_storage("memory://bucket/x")
    assert isinstance(storage, RetryingStorage)
    assert storage.url == "memory://bucket/x"


def test_missing_backend_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(protocol: str) -> None:
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ckptio\[s3\]'") as excinfo:
        open_storage("s3://bucket/run")
    assert isinstance(excinfo.value, ImportError)
    assert "s3://bucket/run" in str(excinfo.value)


def test_unknown_protocol_is_a_value_error() -> None:
    with pytest.raises(InvalidArgumentError, match="nosuchproto"):
        open_storage("nosuchproto://x/y")


def test_join_and_normalize_use_posix_keys() -> None:
    assert join("a", "b/", "/c") == "a/b/c"
    assert join("", "a") == "a"
    assert normalize_key("a//b/./c") == "a/b/c"
    with pytest.raises(ValueError):
        normalize_key("a/../../b")


def test_local_writes_never_leave_temp_files_visible(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)
    writer = storage.open_writer("d/x.bin")
    writer.write(b"partial")
    temp_files = [n for n in os.listdir(tmp_path / "d") if n.startswith(TEMP_PREFIX)]
    assert len(temp_files) == 1  # the temp file sits beside its target, not in /tmp
    assert storage.list("d") == [] and storage.walk() == []
    writer.commit()
    assert os.listdir(tmp_path / "d") == ["x.bin"]


def test_storage_package_never_imports_torch() -> None:
    package_dir = Path(ckptio.storage.__file__).parent
    for source in package_dir.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("torch", "safetensors")), f"{source.name} imports {name}"


def test_s3_clients_compute_only_the_checksums_a_request_requires() -> None:
    from ckptio.storage.registry import _filesystem_options

    config = _filesystem_options("s3", {})["config_kwargs"]
    assert config["request_checksum_calculation"] == "when_required"
    assert config["response_checksum_validation"] == "when_required"
    assert config["max_pool_connections"] >= 16
    mine = _filesystem_options("s3", {"config_kwargs": {"request_checksum_calculation": "when_supported"}})
    assert mine["config_kwargs"]["request_checksum_calculation"] == "when_supported"  # the user's choice wins
