"""Faults from real servers (SeaweedFS, fake-gcs-server), not from wrappers.

* wrong credentials and a missing bucket fail at construction (the write probe), at once, without retries
  (SeaweedFS creates a missing bucket on a write: the probe reads before it writes);
* a server SIGKILLed in the middle of a save and restarted: the save failed or completed, and nothing
  partial is taken as complete;
* a server that stops answering (SIGSTOP) in the middle of a save: the save fails within the stall
  timeout instead of hanging, and the previous checkpoint stays the latest.

The kill and stop tests run a private server each, so the session's shared servers are not disturbed.
fake-gcs-server accepts any token (it does not check credentials), so wrong credentials are tested on S3 only.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from reliability_figures import record
from servers import PersistentFakeGCSServer, SeaweedS3Server
from torch import nn

from ckptio import CheckpointConfig, CheckpointManager
from ckptio.checkpoint import find_latest_checkpoint
from ckptio.checkpoint.layout import IN_PROGRESS_NAME
from ckptio.errors import BucketNotFoundError, CkptioError, StoragePermissionError
from ckptio.storage import CountingStorage, RetryPolicy, open_storage
from ckptio.storage.probe import PROBE_PREFIX

#: A retry policy that lets a restarted server come back, but not forever.
PATIENT = RetryPolicy(max_attempts=4, base_delay=0.2, max_delay=1.0, deadline=20.0)
STALL_TIMEOUT_S = 3.0
#: Parameters of the large model of the second save (4 x 2048 x 8192 floats: 256 MiB).
LARGE = (4, 2048, 8192)


def _retry_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "retrying" in r.getMessage()]


def _manager(url: str, options: dict[str, Any], model: nn.Module, **config: Any) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(output_dir=url, storage_options=options, **config), None, model=model)


def _large_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers, rows, cols = LARGE
    return nn.Sequential(*[nn.Linear(cols, rows, bias=False) for _ in range(layers)])


def _small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(64, 32)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loads_bit_exact(url: str, options: dict[str, Any], expected: dict[str, torch.Tensor], like: nn.Module) -> None:
    """The latest checkpoint loads into a model shaped like ``like`` and equals ``expected``, bit for bit."""
    target = like
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    _manager(url, options, target, write_probe=False).load_checkpoint(None)
    got = target.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


# --------------------------------------------------------------------------- wrong credentials, missing bucket


def test_wrong_credentials_fail_at_construction_without_retries(s3_server, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="ckptio")
    url = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    options = {**s3_server.storage_options, "secret": "not-the-secret"}
    started = time.monotonic()
    with pytest.raises(StoragePermissionError) as caught:
        _manager(url, options, _small_model(0))
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert url in message and "not writable" in message and "\n" not in message, message
    assert "not-the-secret" not in message and s3_server.secret not in message
    assert elapsed < 10, elapsed
    assert _retry_records(caplog) == []
    record("wrong credentials at construction", backend="s3", faults=1, retries=0, seconds=round(elapsed, 2))


def test_wrong_key_id_fails_at_construction_too(s3_server) -> None:
    url = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    options = {**s3_server.storage_options, "key": "no-such-key"}
    with pytest.raises(StoragePermissionError, match="not writable"):
        _manager(url, options, _small_model(0))


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_missing_bucket_fails_at_construction_without_retries(backend: str, request, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="ckptio")
    server = request.getfixturevalue(f"{backend}_server")
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    url = f"{'s3' if backend == 's3' else 'gs'}://{bucket}/run"
    started = time.monotonic()
    with pytest.raises(BucketNotFoundError) as caught:
        _manager(url, server.storage_options, _small_model(0))
    elapsed = time.monotonic() - started
    assert url in str(caught.value) and f"bucket {bucket!r} does not exist" in str(caught.value)
    assert elapsed < 10, elapsed
    assert _retry_records(caplog) == []
    record("missing bucket at construction", backend=backend, faults=1, retries=0, seconds=round(elapsed, 2))


@pytest.mark.parametrize("backend_url", ["s3", "gcs"], indirect=True)
def test_the_probe_costs_three_requests_once_and_leaves_nothing(backend_url) -> None:
    counting = CountingStorage(open_storage(backend_url.url, **backend_url.storage_options))
    config = CheckpointConfig(output_dir=backend_url.url, storage_options=backend_url.storage_options)
    manager = CheckpointManager(config, None, model=_small_model(0), storage=counting)
    assert dict(counting.requests) == {"read": 1, "write": 1, "delete": 1}
    manager.save_checkpoint()
    assert counting.requests["write"] > 1
    root = open_storage(backend_url.url, **backend_url.storage_options)
    assert not [k for k in root.walk() if k.rsplit("/", 1)[-1].startswith(PROBE_PREFIX)]


def test_a_read_only_user_switches_the_probe_off(s3_server) -> None:
    """Loading from a location one cannot write: no probe, the load works."""
    url = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    model = _small_model(1)
    _manager(url, s3_server.storage_options, model).save_checkpoint()
    counting = CountingStorage(open_storage(url, **s3_server.storage_options))
    config = CheckpointConfig(output_dir=url, storage_options=s3_server.storage_options, write_probe=False)
    loaded = _small_model(2)
    CheckpointManager(config, None, model=loaded, storage=counting).load_checkpoint(None)
    assert counting.requests.get("write", 0) == 0 and counting.requests.get("delete", 0) == 0
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))


# --------------------------------------------------------------------------- private servers


@pytest.fixture(params=["s3", "gcs"])
def private_server(request: pytest.FixtureRequest) -> Iterator[SeaweedS3Server | PersistentFakeGCSServer]:
    """A server of this test's own (own data directory, own ports), stopped afterwards."""
    server: SeaweedS3Server | PersistentFakeGCSServer
    server = SeaweedS3Server(timeout=120) if request.param == "s3" else PersistentFakeGCSServer(timeout=120)
    server.start()
    try:
        yield server
    finally:
        server.resume()  # a stopped process cannot handle SIGTERM
        _drain_fsspec_loop()
        server.stop()


def _drain_fsspec_loop(timeout: float = 90.0) -> None:
    """Wait for requests the test left running on fsspec's I/O loop (deletes carry on after their
    caller stopped waiting) to finish while the server answers again: left behind, their clients'
    retry backoff would draw from the global ``random`` that later tests save as RNG state."""
    import asyncio

    from fsspec.asyn import get_loop

    loop = get_loop()

    async def others() -> int:
        return len(asyncio.all_tasks()) - 1

    deadline = time.monotonic() + timeout
    while asyncio.run_coroutine_threadsafe(others(), loop).result() and time.monotonic() < deadline:
        time.sleep(0.2)


def _url(server: SeaweedS3Server | PersistentFakeGCSServer) -> str:
    scheme = "s3" if isinstance(server, SeaweedS3Server) else "gs"
    return f"{scheme}://{server.bucket}/{uuid.uuid4().hex}"


def _backend(server: SeaweedS3Server | PersistentFakeGCSServer) -> str:
    return "s3" if isinstance(server, SeaweedS3Server) else "gcs"


class _SaveInThread:
    """``manager.save_checkpoint()`` on a thread; records its result or its error."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.result: str | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._manager = manager
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.result = self._manager.save_checkpoint()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        self.seconds = time.monotonic() - started

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Whether the save ended within ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _wait_for_upload_start(url: str, options: dict[str, Any], save: _SaveInThread, timeout: float = 60.0) -> None:
    """Return once the second checkpoint's in-progress marker exists (its files are being written next)."""
    watcher = open_storage(url, **options)
    marker = f"checkpoints/checkpoint-2/{IN_PROGRESS_NAME}"
    deadline = time.monotonic() + timeout
    while not watcher.exists(marker):
        if save.join(0.0):  # it ended (failed, or finished) before the marker was seen
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the second save did not start within {timeout:.0f}s")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_killed_mid_save_and_restarted_keeps_a_complete_latest(private_server) -> None:
    server = private_server
    url, options = _url(server), {**server.storage_options, "stall_timeout_s": 20}
    small = _small_model(1)
    _manager(url, options, small, retry=PATIENT).save_checkpoint(checkpoint_id=1)
    first = _weights(small)

    large = _large_model(2)
    second = _weights(large)
    save = _SaveInThread(_manager(url, options, large, retry=PATIENT))
    save.start()
    _wait_for_upload_start(url, options, save)
    time.sleep(0.1)
    killed_mid_save = not save.join(0.0)
    server.kill()
    time.sleep(1.0)
    server.restart()
    assert save.join(180), "the save hung after the server was killed and restarted"

    latest = find_latest_checkpoint(url, storage_options=options)
    assert latest is not None
    if save.error is None:  # it outlived the restart (retries): it must be complete and the latest
        assert latest == save.result and latest.endswith("checkpoint-2")
        _loads_bit_exact(url, options, second, _large_model(3))
    else:
        assert isinstance(save.error, CkptioError), repr(save.error)
        assert url in str(save.error)
        if latest.endswith("checkpoint-2"):  # the manifest went out before the kill
            _loads_bit_exact(url, options, second, _large_model(3))
        else:
            assert latest.endswith("checkpoint-1")
            _loads_bit_exact(url, options, first, _small_model(4))
    record(
        "server SIGKILL mid-save and restart",
        backend=_backend(server),
        faults=1,
        killed_mid_save=int(killed_mid_save),
        save_failed=int(save.error is not None),
        data_lost=0,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_that_stops_answering_fails_the_save_within_the_stall_timeout(private_server) -> None:
    server = private_server
    url = _url(server)
    options = {**server.storage_options, "stall_timeout_s": STALL_TIMEOUT_S}
    small = _small_model(1)
    _manager(url, options, small).save_checkpoint(checkpoint_id=1)
    first = _weights(small)

    save = _SaveInThread(_manager(url, options, _large_model(2)))
    save.start()
    _wait_for_upload_start(url, options, save)
    server.pause()
    paused = time.monotonic()
    try:
        assert save.join(120), "the save still hangs 120 s after the server stopped answering"
        waited = time.monotonic() - paused
    finally:
        server.resume()
    assert save.error is not None, f"the save completed before the server was stopped ({save.result})"
    assert isinstance(save.error, CkptioError), repr(save.error)
    message = str(save.error)
    assert url in message and "did not answer" in message and "intact" in message, message
    assert waited < 60, waited

    latest = find_latest_checkpoint(url, storage_options={**options, "stall_timeout_s": 30})
    assert latest is not None and latest.endswith("checkpoint-1"), latest
    _loads_bit_exact(url, {**options, "stall_timeout_s": 30}, first, _small_model(4))
    record(
        "server SIGSTOP mid-upload",
        backend=_backend(server),
        faults=1,
        seconds_to_fail=round(waited, 1),
        stall_timeout_s=int(STALL_TIMEOUT_S),
        data_lost=0,
    )
