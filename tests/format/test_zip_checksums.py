"""torch.save's own zip CRC32 is skipped while ckptio saves (the manifest holds a CRC32C); torch's
switch is per thread, and is given back as the user left it."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.utils.serialization

from ckptio.format.torch_io import (
    read_torch_file,
    without_zip_checksums,
    write_torch_file,
)
from ckptio.state.component_io import load_component_state, save_component_state
from ckptio.storage import Storage, StorageWrapper, StreamWriter, open_storage

CONFIG = torch.utils.serialization.config.save


class _Watch(StreamWriter):
    def __init__(self, inner: StreamWriter, seen: list[bool]) -> None:
        super().__init__(inner.url)
        self._inner, self._seen = inner, seen

    def _write(self, data: memoryview) -> int:
        self._seen.append(bool(CONFIG.compute_crc32))
        return self._inner.write(data)

    def _commit(self) -> None:
        self._inner.commit()

    def _abort(self) -> None:
        self._inner.abort()


class WatchingStorage(StorageWrapper):
    """Records torch's zip-CRC switch at every write."""

    def __init__(self, inner: Storage, seen: list[bool] | None = None) -> None:
        super().__init__(inner)
        self.seen: list[bool] = [] if seen is None else seen

    def rewrap(self, inner: Storage) -> WatchingStorage:
        return WatchingStorage(inner, self.seen)

    def open_writer(self, key: str) -> StreamWriter:
        return _Watch(self.inner.open_writer(key), self.seen)


@pytest.fixture
def user_setting() -> Any:
    before = CONFIG.compute_crc32
    yield
    CONFIG.compute_crc32 = before


@pytest.mark.parametrize("users_value", [True, False])
def test_saves_skip_the_zip_crc_and_give_the_switch_back(tmp_path: Any, user_setting: None, users_value: bool) -> None:
    CONFIG.compute_crc32 = users_value
    storage = WatchingStorage(open_storage(str(tmp_path)))
    tensors = {"w": torch.randn(64, 64)}
    write_torch_file(storage, "pytorch_model.bin", tensors)
    save_component_state(storage, "optimizer.pt", {"state": {0: {"exp_avg": torch.randn(32)}}})
    assert storage.seen and not any(storage.seen)
    assert CONFIG.compute_crc32 is users_value
    assert torch.equal(read_torch_file(storage, "pytorch_model.bin")["w"], tensors["w"])
    assert load_component_state(storage, "optimizer.pt")["state"][0]["exp_avg"].shape == (32,)


def test_the_switch_is_only_this_threads(user_setting: None) -> None:
    CONFIG.compute_crc32 = True
    seen_elsewhere: list[bool] = []
    with without_zip_checksums():
        assert CONFIG.compute_crc32 is False
        other = threading.Thread(target=lambda: seen_elsewhere.append(bool(CONFIG.compute_crc32)))
        other.start()
        other.join(10)
    assert seen_elsewhere == [True]  # a user's torch.save on another thread still writes zip CRCs
    assert CONFIG.compute_crc32 is True
