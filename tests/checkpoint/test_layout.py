"""Checkpoint names and paths (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptio.checkpoint import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    METRICS_NAME,
    checkpoint_dir_name,
    join_location,
    next_checkpoint_path,
    parse_checkpoint_id,
)
from ckptio.errors import InvalidArgumentError
from ckptio.storage import open_storage


def test_layout_names() -> None:
    assert (CHECKPOINTS_DIR, CHECKPOINT_PREFIX) == ("checkpoints", "checkpoint-")
    assert (MANIFEST_NAME, IN_PROGRESS_NAME, METRICS_NAME) == (
        "checkpoint_manifest.json",
        "checkpoint_in_progress.json",
        "eval_metrics.json",
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("checkpoint-7", 7),
        ("checkpoint-0", 0),
        ("checkpoint-007", 7),
        ("checkpoint-123456789012", 123456789012),
        ("checkpoint-", None),
        ("checkpoint-x", None),
        ("checkpoint-7a", None),
        ("checkpoint--7", None),
        ("checkpoint-7/", None),
        ("runs/checkpoint-7", None),
        ("ckpt-7", None),
        ("checkpoint-\u0663", None),  # an Arabic-Indic digit is not a step number
    ],
)
def test_parse_checkpoint_id(name: str, expected: int | None) -> None:
    assert parse_checkpoint_id(name) == expected


@pytest.mark.parametrize(
    ("ident", "expected"),
    [
        (7, "checkpoint-7"),
        (0, "checkpoint-0"),
        ("12", "checkpoint-12"),
        ("final", "checkpoint-final"),
        ("checkpoint-7", "checkpoint-7"),
    ],
)
def test_checkpoint_dir_name(ident: int | str, expected: str) -> None:
    assert checkpoint_dir_name(ident) == expected


@pytest.mark.parametrize("ident", [-1, True, "", "..", "a/b", "a\\b", "s3:x", 1.5, None])
def test_checkpoint_dir_name_refuses_unsafe_ids(ident: object) -> None:
    with pytest.raises(InvalidArgumentError):
        checkpoint_dir_name(ident)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model_dir", "expected"),
    [
        ("/tmp/run", "/tmp/run/checkpoints/checkpoint-3"),
        ("/tmp/run/", "/tmp/run/checkpoints/checkpoint-3"),
        ("run", "run/checkpoints/checkpoint-3"),
        ("s3://bucket/run", "s3://bucket/run/checkpoints/checkpoint-3"),
        ("s3://bucket/run/", "s3://bucket/run/checkpoints/checkpoint-3"),
        ("gs://bucket", "gs://bucket/checkpoints/checkpoint-3"),
        ("file:///tmp/run", "file:///tmp/run/checkpoints/checkpoint-3"),
        (Path("/tmp/run"), "/tmp/run/checkpoints/checkpoint-3"),
    ],
)
def test_next_checkpoint_path_keeps_the_callers_form(model_dir: str | Path, expected: str) -> None:
    assert next_checkpoint_path(model_dir, 3) == expected


def test_next_checkpoint_path_of_a_storage_is_its_url() -> None:
    storage = open_storage("memory://layout-test/run")
    assert next_checkpoint_path(storage, 5) == "memory://layout-test/run/checkpoints/checkpoint-5"


def test_join_location_with_empty_key_is_the_base_itself() -> None:
    assert join_location("s3://b/run/", "") == "s3://b/run/"
    assert join_location("run", "checkpoints/checkpoint-1") == "run/checkpoints/checkpoint-1"


def test_next_checkpoint_path_takes_storage_options_like_every_directory_function() -> None:
    options = {"key": "k", "secret": "s"}
    assert next_checkpoint_path("s3://b/run", 7, storage_options=options) == "s3://b/run/checkpoints/checkpoint-7"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("rank00000-part000.distcp", True),
        ("rank00012-part003.distcp", True),
        ("dcp_metadata.pkl", True),
        ("rank0-part0.distcp", False),
        ("notes/rank00000-part000.distcp", False),
        ("rank00000-part000.distcp.bak", False),
    ],
)
def test_files_of_sharded_state_count_as_checkpoint_files(key: str, expected: bool) -> None:
    from ckptio.checkpoint.layout import is_checkpoint_file

    assert is_checkpoint_file(key) is expected
