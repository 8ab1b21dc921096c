"""The command line never prints credentials: not in output, errors, logs or tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import ckptio
import ckptio.cli.commands
from ckptio.cli import build_parser, main

#: Fake credentials, distinctive enough that any occurrence in output is a leak.
FAKE_KEY = "AKIAFAKEKEY7Q3ZCKPTIO"
FAKE_SECRET = "fake-secret-4c1e9b2d-do-not-print"
FAKE_TOKEN = "fake-token-88d0aa51-do-not-print"


def _assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked in:\n{text}"


def _ckptio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command line in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "ckptio.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# -- global options after the subcommand ---------------------------------------
def test_global_options_are_accepted_after_the_subcommand() -> None:
    args = build_parser().parse_args(["ls", "s3://b/run", "--storage-options", '{"anon": true}', "--debug"])
    assert (args.storage_options, args.debug, args.url) == ('{"anon": true}', True, "s3://b/run")


def test_global_options_before_the_subcommand_are_kept() -> None:
    args = build_parser().parse_args(["--storage-options", '{"anon": true}', "--debug", "verify", "p"])
    assert (args.storage_options, args.debug, args.path) == ('{"anon": true}', True, "p")
    args = build_parser().parse_args(["latest", "u"])
    assert (args.storage_options, args.debug) == (None, False)


def test_options_after_the_subcommand_reach_the_command(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path), "--storage-options", "[1]"]) == 2
    assert "--storage-options must be a JSON object, got list" in capsys.readouterr().err


# -- usage errors redact secret option values -----------------------------------
SECRET_JSON = json.dumps({"key": FAKE_KEY, "secret": FAKE_SECRET, "token": FAKE_TOKEN})


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "u", "--dst-storage-options", SECRET_JSON],  # not an option of ls
        ["ls", "u", f"--dst-storage-options={SECRET_JSON}"],
        ["ls", "u", "--dst-stor", SECRET_JSON],  # an abbreviation
        ["--storage-options", SECRET_JSON, "ls", "u", "--dst-storage-options", SECRET_JSON, "extra"],
        ["--debug", "ls", "u", "v", "--storage-options", SECRET_JSON, "--dst-storage-options", SECRET_JSON],
        ["--storage-options", SECRET_JSON, "frobnicate", "--storage-options", SECRET_JSON],
        ["--debug", "cp", "a", "--dst-storage-options", SECRET_JSON],
        ["--debug", "--storage-options=", SECRET_JSON, "ls", "u"],  # the JSON lands on COMMAND
        ["--debug", "--storage-options", "ls", SECRET_JSON],
    ],
)
def test_usage_errors_never_echo_storage_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "ckptio: error: " in err
    _assert_no_secret(out + err, FAKE_KEY, FAKE_SECRET, FAKE_TOKEN)


def test_usage_error_names_the_redacted_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "u", "--dst-storage-options", SECRET_JSON]) == 2
    assert "--dst-storage-options <redacted>" in capsys.readouterr().err


def test_parser_error_redacts_without_main() -> None:
    with pytest.raises(Exception) as info:
        build_parser().parse_args(["ls", "u", "--dst-storage-options", SECRET_JSON])
    _assert_no_secret(str(info.value), FAKE_KEY, FAKE_SECRET, FAKE_TOKEN)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# -- real S3: every command, successful and failing -----------------------------
@pytest.fixture
def s3_checkpoint(s3_server: Any) -> Iterator[tuple[str, str]]:
    """A run URL on the S3 emulator with one complete checkpoint, and that checkpoint's URL."""
    url = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    torch.manual_seed(0)
    config = ckptio.CheckpointConfig(output_dir=url, storage_options=s3_server.storage_options)
    path = ckptio.CheckpointManager(config, None, model=torch.nn.Linear(4, 4)).save_checkpoint()
    yield url, path
    fs = s3_server.filesystem()
    fs.rm(url.removeprefix("s3://"), recursive=True)


@pytest.mark.parametrize(
    ("command", "target", "after", "debug"),
    [
        ("ls", "run", True, False),
        ("inspect", "ckpt", False, True),
        ("verify", "ckpt", True, True),
        ("latest", "run", True, False),
    ],
)
def test_successful_commands_print_no_secret(
    s3_server: Any, s3_checkpoint: tuple[str, str], command: str, target: str, after: bool, debug: bool
) -> None:
    url = s3_checkpoint[0] if target == "run" else s3_checkpoint[1]
    opts = ["--storage-options", json.dumps(s3_server.storage_options)]
    flags = ["--debug"] if debug else []
    args = [command, url, *opts, *flags] if after else [*opts, *flags, command, url]
    done = _ckptio(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    _assert_no_secret(done.stdout + done.stderr, s3_server.secret)


def _wrong_secret_options(s3_server: Any) -> dict[str, Any]:
    return {
        "key": s3_server.key,
        "secret": FAKE_SECRET,
        "client_kwargs": {"endpoint_url": s3_server.endpoint_url, "aws_secret_access_key": FAKE_SECRET},
    }


@pytest.mark.parametrize("command", ["ls", "latest"])
def test_wrong_secret_fails_without_printing_it(s3_server: Any, s3_checkpoint: tuple[str, str], command: str) -> None:
    done = _ckptio(command, s3_checkpoint[0], "--debug", "--storage-options", json.dumps(_wrong_secret_options(s3_server)))
    assert done.returncode == 1
    assert "ckptio: error: " in done.stderr
    _assert_no_secret(done.stdout + done.stderr, FAKE_SECRET, s3_server.secret)


def test_wrong_secret_on_verify_and_inspect_fails_without_printing_it(
    s3_server: Any, s3_checkpoint: tuple[str, str]
) -> None:
    options = json.dumps(_wrong_secret_options(s3_server))
    for command in ("verify", "inspect"):
        done = _ckptio("--storage-options", options, command, s3_checkpoint[1], "--debug")
        assert done.returncode == 1, done.stdout
        _assert_no_secret(done.stdout + done.stderr, FAKE_SECRET, s3_server.secret)


def test_bad_bucket_fails_without_printing_the_secret(s3_server: Any) -> None:
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}/run"
    done = _ckptio("latest", url, "--debug", "--storage-options", json.dumps(s3_server.storage_options))
    assert done.returncode == 1
    assert "ckptio: error: " in done.stderr
    _assert_no_secret(done.stdout + done.stderr, s3_server.secret)


def test_credentials_from_the_environment_are_not_printed(s3_server: Any, s3_checkpoint: tuple[str, str]) -> None:
    options = {"client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    env = {"AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_SESSION_TOKEN": FAKE_TOKEN}
    done = _ckptio("--debug", "verify", s3_checkpoint[1], "--storage-options", json.dumps(options), env=env)
    assert done.returncode == 1
    _assert_no_secret(done.stdout + done.stderr, FAKE_KEY, FAKE_SECRET, FAKE_TOKEN)


def test_backend_errors_and_logs_are_redacted(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backstop: a credential that a backend puts in its message or log is still not printed."""

    def leaky(url: str, *, storage_options: dict[str, Any]) -> list[Any]:
        ckptio.cli.commands.logger.debug("opening %s with %r", url, storage_options)
        raise RuntimeError(f"backend said: {storage_options}")

    monkeypatch.setattr(ckptio.cli.commands, "list_checkpoints", leaky)
    options = {"key": FAKE_KEY, "client_kwargs": {"aws_secret_access_key": FAKE_SECRET}, "token": {"t": FAKE_TOKEN}}
    assert main(["ls", str(tmp_path), "--debug", "--storage-options", json.dumps(options)]) == 1
    out, err = capsys.readouterr()
    assert "RuntimeError: backend said:" in err and "opening" in err and "Traceback" in err
    _assert_no_secret(out + err, FAKE_KEY, FAKE_SECRET, FAKE_TOKEN)
