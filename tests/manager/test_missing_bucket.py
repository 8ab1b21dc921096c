"""A missing bucket fails a save and a load at once, with an error that says so."""

from __future__ import annotations

import time
import uuid

import pytest
from torch import nn

import ckptio
from ckptio import CheckpointConfig, CheckpointManager
from ckptio.errors import BucketNotFoundError, ObjectNotFoundError
from ckptio.storage.retry import translate_error


@pytest.fixture(params=["s3", "gcs"])
def missing_bucket(request: pytest.FixtureRequest) -> tuple[str, dict]:
    """A URL in a bucket that does not exist on the backend's emulator, and its storage options."""
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return f"s3://{bucket}/run", server.storage_options
    server = request.getfixturevalue("gcs_server")
    return f"gs://{bucket}/run", server.storage_options


def _assert_names_the_bucket(error: BaseException, url: str) -> None:
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    assert f"bucket {bucket!r} does not exist" in str(error)
    assert isinstance(error, ObjectNotFoundError) and isinstance(error, FileNotFoundError)


def test_saving_to_a_missing_bucket_fails_fast(missing_bucket: tuple[str, dict]) -> None:
    url, options = missing_bucket
    # Without the write probe (which fails at construction: tests/manager/test_server_faults.py), the save does.
    config = CheckpointConfig(output_dir=url, storage_options=options, write_probe=False)
    manager = CheckpointManager(config, None, model=nn.Linear(2, 2))
    started = time.monotonic()
    with pytest.raises(BucketNotFoundError) as caught:
        manager.save_checkpoint()
    assert time.monotonic() - started < 10
    _assert_names_the_bucket(caught.value, url)


def test_loading_from_a_missing_bucket_fails_fast(missing_bucket: tuple[str, dict]) -> None:
    url, options = missing_bucket
    started = time.monotonic()
    with pytest.raises(BucketNotFoundError) as caught:
        ckptio.load_checkpoint(url, storage_options=options)
    assert time.monotonic() - started < 10
    _assert_names_the_bucket(caught.value, url)


class _NoSuchBucket(Exception):
    def __init__(self) -> None:
        super().__init__("The specified bucket does not exist")
        self.response = {"ResponseMetadata": {"HTTPStatusCode": 404}, "Error": {"Code": "NoSuchBucket"}}


def test_no_such_bucket_is_translated_to_a_bucket_error() -> None:
    url = "s3://gone/run/x.bin"
    error = translate_error(_NoSuchBucket(), url, "read")
    assert isinstance(error, BucketNotFoundError) and url in str(error)
    _assert_names_the_bucket(error, url)
