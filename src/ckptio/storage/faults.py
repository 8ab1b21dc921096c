"""A fault-injecting storage wrapper for testing crash safety.

Wrap any storage and make it fail the way real systems do::

    from ckptio.storage import FaultInjectingStorage, open_storage

    faulty = FaultInjectingStorage(open_storage("/tmp/run"), fail_after_ops=3)
    # the 4th operation raises InjectedFault; later ones too

* ``fail_after_ops`` / ``fail_after_bytes``: after that many operations (or
  bytes written) every operation raises :class:`InjectedFault`, a permanent
  :class:`~ckptio.errors.StorageError`.
* ``crash=True``: instead of an error the wrapper "dies" at that point: it
  raises :class:`SimulatedCrash` (a ``BaseException``, so ordinary error
  handling does not swallow it) and does nothing afterwards, not even the
  cleanup a dying process could not do (aborting streams, deleting temp
  files). What is left on the inner storage is what a killed process leaves.
* ``transient_rate``: each operation first fails with a transient fault with
  that probability (seeded), which a :class:`~ckptio.storage.RetryingStorage`
  around this wrapper retries.

Operations are counted across children of the wrapper, so a checkpoint save
that opens sub-storages still sees one sequence of operations.
"""

from __future__ import annotations

import builtins
import errno
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ckptio.errors import InjectedFault, SimulatedCrash, TransientFault
from ckptio.storage.base import ObjectInfo, Storage, StreamWriter
from ckptio.storage.wrapper import StorageWrapper

__all__ = ["FaultInjectingStorage", "InjectedFault", "SimulatedCrash"]

T = TypeVar("T")






@dataclass
class _FaultState:
    fail_after_ops: int | None
    fail_after_bytes: int | None
    crash: bool
    transient_rate: float
    rng: random.Random
    operations: int = 0
    bytes_written: int = 0
    transient_faults: int = 0
    tripped: bool = False
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _FaultyWriter(StreamWriter):
    def __init__(self, inner: StreamWriter, storage: FaultInjectingStorage, key: str) -> None:
        super().__init__(inner.url)
        self._inner = inner
        self._storage = storage
        self._key = key

    def _write(self, data: memoryview) -> int:
        state = self._storage._state
        allowed = len(data)
        if state.fail_after_bytes is not None:
            allowed = max(0, min(allowed, state.fail_after_bytes - state.bytes_written))
        if allowed:
            self._inner.write(data[:allowed])
            with state.lock:
                state.bytes_written += allowed
        if allowed < len(data):
            self._storage._trip(self._key, "write")
        return len(data)

    def _commit(self) -> None:
        try:
            self._storage._before(self._key, "commit")
        except Exception:
            # A failed publish leaves nothing and frees the upload (its buffers, its parts);
            # a simulated crash (not an Exception) leaves everything as a killed process would.
            self._inner.abort()
            raise
        self._inner.commit()

    def _abort(self) -> None:
        if self._storage._state.tripped and self._storage._state.crash:
            return  # a dead process aborts nothing
        self._inner.abort()


class FaultInjectingStorage(StorageWrapper):
    """Wraps a storage and injects failures, crashes and transient faults."""

    def __init__(
        self,
        inner: Storage,
        *,
        fail_after_ops: int | None = None,
        fail_after_bytes: int | None = None,
        crash: bool = False,
        transient_rate: float = 0.0,
        seed: int = 0,
        _state: _FaultState | None = None,
    ) -> None:
        super().__init__(inner)
        if not 0.0 <= transient_rate < 1.0:
            raise ValueError(f"transient_rate must be in [0, 1), got {transient_rate}")
        self._state = _state or _FaultState(
            fail_after_ops, fail_after_bytes, crash, transient_rate, random.Random(seed)
        )

    def rewrap(self, inner: Storage) -> FaultInjectingStorage:
        return FaultInjectingStorage(inner, _state=self._state)

    @property
    def operations(self) -> int:
        """Operations attempted so far (including the one that failed)."""
        return self._state.operations

    @property
    def transient_faults(self) -> int:
        """How many transient faults were injected."""
        return self._state.transient_faults

    @property
    def tripped(self) -> bool:
        """Whether the permanent failure or crash has happened."""
        return self._state.tripped

    @property
    def log(self) -> builtins.list[str]:
        """``"action key"`` of every operation attempted, in order."""
        return self._state.log

    def _trip(self, key: str, action: str) -> None:
        state = self._state
        state.tripped = True
        if state.crash:
            raise SimulatedCrash(f"simulated crash at {action} {self.url_of(key)!r}")
        raise InjectedFault(errno.EIO, f"cannot {action} {self.url_of(key)!r}: injected fault")

    def _before(self, key: str, action: str) -> None:
        state = self._state
        with state.lock:
            if not state.tripped:
                state.operations += 1
                state.log.append(f"{action} {key}")
        if state.tripped or (state.fail_after_ops is not None and state.operations > state.fail_after_ops):
            self._trip(key, action)
        if state.transient_rate and state.rng.random() < state.transient_rate:
            with state.lock:
                state.transient_faults += 1
            raise TransientFault(f"injected transient fault on {action} {self.url_of(key)!r}")

    def _op(self, key: str, action: str, fn: Callable[[], T]) -> T:
        self._before(key, action)
        return fn()

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        def write() -> None:
            state = self._state
            if state.fail_after_bytes is not None and state.bytes_written + len(data) > state.fail_after_bytes:
                self._trip(key, "write")
            self.inner.write_bytes(key, data)
            with state.lock:
                state.bytes_written += len(data)

        self._op(key, "write", write)

    def open_writer(self, key: str) -> StreamWriter:
        return _FaultyWriter(self._op(key, "open", lambda: self.inner.open_writer(key)), self, key)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self._op(key, "create", lambda: self.inner.create_exclusive(key, data))

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._op(key, "read", lambda: self.inner.read_bytes(key, start, end))

    def read_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> builtins.list[bytes]:
        return self._op(key, "read", lambda: self.inner.read_ranges(key, ranges))

    def exists(self, key: str) -> bool:
        return self._op(key, "exists", lambda: self.inner.exists(key))

    def is_file(self, key: str) -> bool:
        return self._op(key, "exists", lambda: self.inner.is_file(key))

    def info(self, key: str) -> ObjectInfo:
        return self._op(key, "stat", lambda: self.inner.info(key))

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self._op(prefix, "list", lambda: self.inner.list(prefix))

    def walk(self, prefix: str = "") -> builtins.list[str]:
        return self._op(prefix, "list", lambda: self.inner.walk(prefix))

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return self._op(prefix, "list", lambda: self.inner.list_objects(prefix))

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        self._op(key, "delete", lambda: self.inner.delete(key, missing_ok=missing_ok))

    def delete_many(self, keys: Sequence[str]) -> None:
        self._op(keys[0] if keys else "", "delete", lambda: self.inner.delete_many(keys))

    def delete_prefix(self, prefix: str) -> None:
        self._op(prefix, "delete", lambda: self.inner.delete_prefix(prefix))
