"""Credentials in ``storage_options`` or the environment never reach ckptio's logs, errors or manifest.

Third-party libraries are out of scope for the log check: at DEBUG, botocore logs
request headers (the ``Authorization`` header names the access key id and carries a
signature, not the secret). The tests capture every logger but assert on ckptio's.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import ckptio
from ckptio.errors import CkptioError
from ckptio.storage import open_storage
from ckptio.storage.retry import RetryPolicy

FAKE_SECRET = "fake-secret-0b7d4e19-do-not-log"
FAKE_TOKEN = "fake-token-5a2c83f7-do-not-log"


def _ckptio_records(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] == "ckptio")


def _everything_about(exc: BaseException) -> str:
    """The exception as a user could see it: message, repr, args and the whole formatted chain."""
    return "\n".join([str(exc), repr(exc), repr(exc.args), *traceback.format_exception(exc)])


@pytest.fixture
def run_url(s3_server: Any) -> Iterator[str]:
    url = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    yield url
    fs = s3_server.filesystem()
    if fs.exists(url.removeprefix("s3://")):
        fs.rm(url.removeprefix("s3://"), recursive=True)


@pytest.mark.parametrize(
    "where", ["secret", "client_kwargs", "token"], ids=["secret", "client_kwargs-secret", "token"]
)
def test_wrong_credentials_error_and_logs_hold_no_secret(
    s3_server: Any, run_url: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    options: dict[str, Any] = {"key": s3_server.key, "client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    if where == "secret":
        options["secret"] = FAKE_SECRET
    elif where == "client_kwargs":
        options["client_kwargs"]["aws_secret_access_key"] = FAKE_SECRET
        options["secret"] = FAKE_SECRET
    else:
        options.update(secret=s3_server.secret, token=FAKE_TOKEN)
    storage = open_storage(run_url, retry=RetryPolicy(max_attempts=2, base_delay=0.0), **options)
    with pytest.raises(CkptioError) as info:
        storage.write_bytes("a/b.bin", b"x")
    with pytest.raises(CkptioError) as info2:
        ckptio.checkpoint.list_checkpoints(run_url, storage_options=options)
    for exc in (info.value, info2.value):
        text = _everything_about(exc)
        assert FAKE_SECRET not in text and FAKE_TOKEN not in text and s3_server.secret not in text, text
    logged = _ckptio_records(caplog)
    assert FAKE_SECRET not in logged and FAKE_TOKEN not in logged


def test_environment_secret_is_not_in_errors_or_logs(
    s3_server: Any, run_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    storage = open_storage(run_url, client_kwargs={"endpoint_url": s3_server.endpoint_url})
    with pytest.raises(CkptioError) as info:
        storage.read_bytes("missing-or-forbidden.bin")
    assert FAKE_SECRET not in _everything_about(info.value)
    assert FAKE_SECRET not in _ckptio_records(caplog)


def test_save_and_load_log_and_manifest_hold_no_secret(
    s3_server: Any, run_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = s3_server.secret
    torch.manual_seed(0)
    config = ckptio.CheckpointConfig(output_dir=run_url, storage_options=s3_server.storage_options)
    model = torch.nn.Linear(4, 4)
    manager = ckptio.CheckpointManager(config, None, model=model)
    path = manager.save_checkpoint()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    assert not torch.equal(model.weight, before["weight"])
    manager.load_checkpoint(path)
    torch.testing.assert_close(model.state_dict(), before)

    assert any(r.name.startswith("ckptio") for r in caplog.records)
    assert secret not in _ckptio_records(caplog)
    storage = open_storage(path, **s3_server.storage_options)
    for key in storage.walk(""):
        if key.endswith(".json") or key.endswith(".pt") or key.endswith(".safetensors"):
            assert secret.encode() not in storage.read_bytes(key), key


def test_a_printed_config_does_not_show_its_storage_options() -> None:
    from ckptio import CheckpointConfig

    config = CheckpointConfig(output_dir="s3://bucket/run", storage_options={"secret": "sekrit-value-123"})
    assert "sekrit-value-123" not in repr(config) and "sekrit-value-123" not in str(config)


def test_the_write_probe_of_a_manager_with_a_wrong_secret_holds_no_secret(
    s3_server: Any, run_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    options = {**s3_server.storage_options, "secret": FAKE_SECRET}
    config = ckptio.CheckpointConfig(output_dir=run_url, storage_options=options)
    with pytest.raises(CkptioError, match="write probe") as info:
        ckptio.CheckpointManager(config, None, model=torch.nn.Linear(2, 2))
    assert run_url in str(info.value)
    assert FAKE_SECRET not in _everything_about(info.value)
    assert FAKE_SECRET not in _ckptio_records(caplog)
