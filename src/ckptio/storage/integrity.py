"""File sizes and CRC32C checksums of everything a checkpoint holds.

Checksums are computed while bytes stream out (:class:`ChecksumWriter`), so a
save never reads its own output back; :func:`checksum_object` recomputes one
from storage when a checkpoint is verified. A large slice is checksummed on
another thread while the writer takes it (CRC32C releases the GIL), so the
checksum adds next to nothing to a save's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import crc32c as _crc32c

from ckptio.storage.base import Storage, StreamWriter
from ckptio.storage.transfer import run_alongside

__all__ = ["ChecksumWriter", "Crc32c", "FileRecord", "checksum_bytes", "checksum_object"]

_READ_CHUNK = 16 * 2**20
#: Slices at least this big are checksummed while the inner writer takes them.
_OVERLAP_BYTES = 1 << 20


class Crc32c:
    """Incremental CRC32C (Castagnoli), hardware accelerated, reported as 8 hex digits."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._value = _crc32c.crc32c(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint: its key relative to the checkpoint, size and CRC32C."""

    path: str
    size: int
    crc32c: str

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "crc32c": self.crc32c}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> FileRecord:
        return cls(path=str(data["path"]), size=int(str(data["size"])), crc32c=str(data["crc32c"]))


def checksum_bytes(data: bytes | bytearray | memoryview) -> str:
    """CRC32C of ``data`` as 8 hex digits."""
    crc = Crc32c()
    crc.update(data)
    return crc.hexdigest()


def checksum_object(storage: Storage, key: str, *, chunk_size: int = _READ_CHUNK) -> FileRecord:
    """Read ``key`` back in ranged chunks and return its record."""
    size = storage.size(key)
    crc = Crc32c()
    for start in range(0, size, chunk_size):
        crc.update(storage.read_bytes(key, start, min(size, start + chunk_size)))
    return FileRecord(path=key, size=size, crc32c=crc.hexdigest())


class ChecksumWriter(StreamWriter):
    """Wraps a writer and checksums what passes through; ``record`` is set on commit."""

    def __init__(self, inner: StreamWriter, path: str) -> None:
        super().__init__(inner.url)
        self._inner = inner
        self._path = path
        self._crc = Crc32c()
        self.record: FileRecord | None = None

    def _write(self, data: memoryview) -> int:
        if data.nbytes < _OVERLAP_BYTES:
            self._crc.update(data)
            return self._inner.write(data)
        return run_alongside(lambda: self._crc.update(data), lambda: self._inner.write(data))

    def _commit(self) -> None:
        self._inner.commit()
        self.record = FileRecord(self._path, self.bytes_written, self._crc.hexdigest())

    def _abort(self) -> None:
        self._inner.abort()
