"""One rank's component files go out several at once on remote storage, one at a time on local disk."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from ckptio import SharingPattern, StateComponent, TrainingProgress
from ckptio.manager.components import save_components
from ckptio.state import World
from ckptio.storage import Storage, StorageWrapper, StreamWriter, open_storage


class _SlowWriter(StreamWriter):
    def __init__(self, inner: StreamWriter, owner: SlowStorage) -> None:
        super().__init__(inner.url)
        self._inner = inner
        self._owner = owner

    def _write(self, data: memoryview) -> int:
        return self._inner.write(data)

    def _commit(self) -> None:
        time.sleep(0.2)  # a round trip
        self._inner.commit()
        self._owner.leave()

    def _abort(self) -> None:
        self._inner.abort()
        self._owner.leave()


class SlowStorage(StorageWrapper):
    """Slow commits; counts how many writers are open at once. ``remote`` decides ``is_remote``."""

    def __init__(self, inner: Storage, remote: bool) -> None:
        super().__init__(inner)
        self.remote = remote
        self.lock = threading.Lock()
        self.open_now = 0
        self.most_open = 0

    def leave(self) -> None:
        with self.lock:
            self.open_now -= 1

    def open_writer(self, key: str) -> StreamWriter:
        with self.lock:
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
        return _SlowWriter(self.inner.open_writer(key), self)

    @property
    def is_remote(self) -> bool:
        return self.remote


def components() -> list[StateComponent]:
    parts: list[StateComponent] = []
    for i in range(6):
        progress = TrainingProgress()
        progress.step = i
        parts.append(StateComponent(f"part{i}", progress, SharingPattern.GLOBAL))
    return parts


@pytest.mark.parametrize("remote", [True, False], ids=["remote", "local"])
def test_component_files_upload_concurrently_only_where_it_helps(tmp_path: Any, remote: bool) -> None:
    storage = SlowStorage(open_storage(str(tmp_path / "ckpt")), remote)
    parts = components()
    written = save_components(storage, parts, World())
    assert [f.key for f in written] == [c.key for c in parts]  # input order, whatever finished first
    assert sorted(storage.inner.list("")) == sorted(f.record.path for f in written)
    if remote:
        assert storage.most_open > 1
    else:
        assert storage.most_open == 1
