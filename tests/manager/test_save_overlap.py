"""On object stores a save uploads the weights and the components at the same time; on local
disk one after the other. Resume reads them the same way."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from manager_helpers import TinyTrainer, same_state, state_of

from ckptio import CheckpointConfig, CheckpointManager
from ckptio.storage import Storage, StorageWrapper, StreamWriter, open_storage


class _Timeline:
    """Which files are being written or read at once, across every child storage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: set[str] = set()
        self.together: set[frozenset[str]] = set()

    def enter(self, key: str) -> None:
        with self.lock:
            self.open.add(key)
            for other in self.open - {key}:
                self.together.add(frozenset((key, other)))

    def leave(self, key: str) -> None:
        with self.lock:
            self.open.discard(key)

    def overlapped(self, is_weights: Any) -> bool:
        return any(len({bool(is_weights(k)) for k in pair}) == 2 for pair in self.together)


class _SlowWriter(StreamWriter):
    def __init__(self, inner: StreamWriter, key: str, timeline: _Timeline) -> None:
        super().__init__(inner.url)
        self._inner, self._key, self._timeline = inner, key, timeline

    def _write(self, data: memoryview) -> int:
        return self._inner.write(data)

    def _commit(self) -> None:
        time.sleep(0.2)  # a round trip
        self._inner.commit()
        self._timeline.leave(self._key)

    def _abort(self) -> None:
        self._inner.abort()
        self._timeline.leave(self._key)


class SlowStorage(StorageWrapper):
    """Slow writes and reads that record what overlaps; ``remote`` decides ``is_remote``."""

    def __init__(self, inner: Storage, remote: bool = True, timeline: _Timeline | None = None) -> None:
        super().__init__(inner)
        self.remote = remote
        self.timeline = timeline or _Timeline()

    def rewrap(self, inner: Storage) -> SlowStorage:
        return SlowStorage(inner, self.remote, self.timeline)

    @property
    def is_remote(self) -> bool:
        return self.remote

    def local_path(self, key: str = "") -> str | None:
        return None  # every read goes through read_bytes, as on an object store

    def open_writer(self, key: str) -> StreamWriter:
        self.timeline.enter(key)
        return _SlowWriter(self.inner.open_writer(key), key, self.timeline)

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self.timeline.enter(key)
        try:
            time.sleep(0.1)
            return self.inner.read_bytes(key, start, end)
        finally:
            self.timeline.leave(key)


def _is_weights(key: str) -> bool:
    return key.startswith("model")


@pytest.mark.parametrize("remote", [True, False], ids=["remote", "local"])
def test_weights_and_components_move_together_only_where_it_helps(tmp_path: Any, remote: bool) -> None:
    storage = SlowStorage(open_storage(str(tmp_path / "run")), remote)
    trainer = TinyTrainer()
    trainer.step()
    config = CheckpointConfig(output_dir=str(tmp_path / "run"), save_safetensors=True)
    manager = CheckpointManager(config, trainer, model=trainer.model, storage=storage)
    manager.save_checkpoint()
    assert storage.timeline.overlapped(_is_weights) is remote

    fresh = TinyTrainer(seed=1)
    fresh.step()
    assert not same_state(state_of(fresh), state_of(trainer))
    storage.timeline.together.clear()
    CheckpointManager(config, fresh, model=fresh.model, storage=storage).load_checkpoint(None)
    assert same_state(state_of(fresh), state_of(trainer))
    assert storage.timeline.overlapped(_is_weights) is remote
