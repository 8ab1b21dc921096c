"""A read-only, seekable file over bytes already in memory, without copying them.

``io.BytesIO`` copies a ``bytearray`` or ``memoryview`` it is given, and HTTP
clients copy a ``bytes``-like request body (botocore and aiohttp: twice for a
``bytearray``) where they read a file body in small chunks. Hand-written
because the standard library has no zero-copy file over a buffer.
"""

from __future__ import annotations

import io
from typing import Any

__all__ = ["ViewFile"]


class ViewFile(io.RawIOBase):
    """A file reading ``data`` in place: for ``torch.load`` of a downloaded object, or as an
    upload body an HTTP client streams.

    Closing keeps the bytes readable, because an HTTP client closes a body it has sent and
    may rewind it to send it again; :meth:`release` lets go of them.
    """

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._view.nbytes}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        chunk = self._view[self._pos : self._pos + target.nbytes]
        target[: chunk.nbytes] = chunk
        self._pos += chunk.nbytes
        return chunk.nbytes

    def read(self, size: int | None = -1) -> bytes:
        end = self._view.nbytes if size is None or size < 0 else self._pos + size
        chunk = bytes(self._view[self._pos : end])
        self._pos += len(chunk)
        return chunk

    def __len__(self) -> int:
        return self._view.nbytes

    def release(self) -> None:
        """Let go of the bytes now rather than when this file is collected; then close."""
        self._view.release()
        self.close()
