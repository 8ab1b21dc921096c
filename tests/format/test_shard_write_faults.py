"""A storage failure while a shard streams out: a ckptio error naming the shard, transient ones retried."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from ckptio.errors import (
    CkptioError,
    StorageError,
    StoragePermissionError,
    TransientStorageError,
)
from ckptio.format import WEIGHTS_INDEX_NAME, load_checkpoint, save_checkpoint
from ckptio.storage import (
    FaultInjectingStorage,
    RetryingStorage,
    RetryPolicy,
    Storage,
    StorageWrapper,
    StreamWriter,
)

FAST = RetryPolicy(max_attempts=5, base_delay=0.0005, max_delay=0.002, deadline=30)
SHARD = "pytorch_model-00001-of-00001.bin"
FORMATS = pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))  # about 33 KB: a shard of several writes


def _assert_loads_as(storage: Storage, model: nn.Module) -> None:
    target = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    load_checkpoint(storage, target, strict=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], tensor, rtol=0, atol=0)


class _BreakingWriter(StreamWriter):
    def __init__(self, inner: StreamWriter, owner: _BreakMidStream) -> None:
        super().__init__(inner.url)
        self._inner, self._owner = inner, owner

    def _write(self, data: memoryview) -> int:
        if self.bytes_written + len(data) > self._owner.after_bytes and self._owner.failures_left > 0:
            self._owner.failures_left -= 1
            raise self._owner.error()
        return self._inner.write(data)

    def _commit(self) -> None:
        self._inner.commit()

    def _abort(self) -> None:
        self._inner.abort()


class _BreakMidStream(StorageWrapper):
    """Raises ``error()`` from the middle of the next ``failures`` streams, as a backend would."""

    def __init__(self, inner: Storage, error: Callable[[], Exception], failures: int, after_bytes: int = 5000) -> None:
        super().__init__(inner)
        self.error, self.failures_left, self.after_bytes = error, failures, after_bytes
        self.opened = 0

    def open_writer(self, key: str) -> StreamWriter:
        self.opened += 1
        return _BreakingWriter(self.inner.open_writer(key), self)


def test_a_permanent_fault_mid_bin_shard_is_a_storage_error_naming_it(storage: Storage) -> None:
    faulty = FaultInjectingStorage(storage, fail_after_bytes=5000)
    with pytest.raises(StorageError, match=re.escape(storage.url_of(SHARD))) as caught:
        save_checkpoint(faulty, _model(), safetensors=False)
    assert isinstance(caught.value, CkptioError)
    assert faulty.tripped
    assert storage.list() == []  # the aborted stream published nothing, and no index


def test_a_backend_error_mid_bin_shard_is_translated_and_chained(storage: Storage) -> None:
    flaky = _BreakMidStream(storage, lambda: PermissionError("access denied mid-upload"), failures=1)
    with pytest.raises(StoragePermissionError, match=re.escape(storage.url_of(SHARD))) as caught:
        save_checkpoint(RetryingStorage(flaky, FAST), _model(), safetensors=False)
    assert isinstance(caught.value.__cause__, PermissionError)
    assert flaky.opened == 1  # permanent: not retried
    assert storage.list() == []


@FORMATS
def test_a_transient_failure_mid_shard_writes_the_shard_again(storage: Storage, safetensors: bool) -> None:
    model = _model()
    flaky = _BreakMidStream(storage, lambda: ConnectionResetError("connection reset mid-upload"), failures=2)
    save_checkpoint(RetryingStorage(flaky, FAST), model, safetensors=safetensors)
    assert flaky.opened == 3 and flaky.failures_left == 0
    _assert_loads_as(storage, model)


def test_a_transient_failure_that_persists_gives_up_naming_the_shard(storage: Storage) -> None:
    flaky = _BreakMidStream(storage, lambda: TimeoutError("timed out mid-upload"), failures=100)
    with pytest.raises(TransientStorageError, match=re.escape(storage.url_of(SHARD))) as caught:
        save_checkpoint(RetryingStorage(flaky, FAST), _model(), safetensors=False)
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert flaky.opened == FAST.max_attempts
    assert storage.list() == []


def test_injected_transient_faults_on_a_bin_shard_are_retried(storage: Storage) -> None:
    model = _model()
    # Seeded: the shard's first commit fails transiently (a streaming upload is not retried
    # by the storage layer; the writer writes the shard again).
    faulty = FaultInjectingStorage(storage, transient_rate=0.5, seed=3)
    save_checkpoint(RetryingStorage(faulty, FAST), model, safetensors=False)
    assert faulty.transient_faults > 0
    assert faulty.log.count(f"commit {SHARD}") >= 2
    assert storage.exists(WEIGHTS_INDEX_NAME)
    _assert_loads_as(storage, model)
