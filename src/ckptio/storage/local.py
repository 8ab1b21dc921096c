"""Local-disk storage: atomic writes by temp file, fsync and ``os.replace``.

Every write goes to a temporary file *beside* its target (the same directory,
so the rename never crosses filesystems), is flushed and fsynced, renamed over
the target with ``os.replace`` and made durable by fsyncing the directory. A
process killed mid-write leaves at most a hidden temporary file, which
listings skip and :meth:`LocalStorage.delete_prefix` removes.

Reads never leave the root: an object that is a symbolic link (or lies under
one) resolving outside the root directory is refused, so a checkpoint holding
a link to ``/etc/passwd`` or to another run cannot make ckptio read it.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from typing import TypeVar

from ckptio.errors import (
    CkptioError,
    ObjectExistsError,
    ObjectNotFoundError,
    StoragePermissionError,
)
from ckptio.storage.base import (
    TEMP_PREFIX,
    ObjectInfo,
    Storage,
    StreamWriter,
    join,
    normalize_key,
)
from ckptio.storage.retry import raise_translated

__all__ = ["LocalStorage", "TEMP_PREFIX"]

T = TypeVar("T")

def _fsync_dir(path: str) -> None:
    """Make a rename or unlink in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename still happened
    finally:
        os.close(fd)


def _temp_path_beside(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")


class _LocalWriter(StreamWriter):
    def __init__(self, path: str, url: str) -> None:
        super().__init__(url)
        self._path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._tmp = _temp_path_beside(path)
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    def _write(self, data: memoryview) -> int:
        return self._file.write(data)

    def _commit(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._path)
            _fsync_dir(os.path.dirname(self._path))
        except BaseException:
            self._discard()
            raise

    def _abort(self) -> None:
        self._discard()

    def _release(self) -> None:
        self._file.close()

    def _discard(self) -> None:
        self._file.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


def _object_info(key: str, st: os.stat_result) -> ObjectInfo:
    # inode and nanosecond mtime change on every atomic replace: a version token.
    return ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime, version=f"{st.st_ino}:{st.st_mtime_ns}")


class LocalStorage(Storage):
    """Storage in a local directory (created on first write)."""

    protocol = "file"

    def __init__(self, root: str, *, follow_symlinks: bool = False) -> None:
        """``follow_symlinks``: also read symbolic links that lead outside ``root`` (a Hugging Face
        hub cache snapshot links to ``../../blobs``); off by default."""
        if root.startswith("file://"):
            root = root[len("file://") :]
        self._root = os.path.abspath(os.path.expanduser(root))
        self._follow_symlinks = follow_symlinks

    @property
    def url(self) -> str:
        return self._root

    def _path(self, key: str) -> str:
        key = normalize_key(key)
        return os.path.join(self._root, *key.split("/")) if key else self._root

    def _escapes(self, path: str) -> str | None:
        """Where ``path`` really leads, if a symbolic link takes it outside the root; else None."""
        if self._follow_symlinks:
            return None
        real = os.path.realpath(path)
        root = os.path.realpath(self._root)
        inside = real == root or real.startswith(root.rstrip(os.sep) + os.sep)
        return None if inside else real

    def _read_path(self, key: str) -> str:
        """The path to read ``key`` from; refuses a symbolic link that leads outside the root."""
        path = self._path(key)
        target = self._escapes(path)
        if target is not None:
            raise StoragePermissionError(
                errno.EACCES,
                f"refusing to read {self.url_of(key)!r}: it is a symbolic link to {target!r}, "
                f"outside {self.url!r}; nothing was read or changed (storage option follow_symlinks=True reads it)",
            )
        return path

    def _do(self, key: str, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except CkptioError:
            raise  # already names the object; ``raise exc from exc`` would make it its own cause
        except OSError as exc:
            raise_translated(exc, self.url_of(key), action)

    def child(self, key: str) -> LocalStorage:
        return LocalStorage(self._path(key), follow_symlinks=self._follow_symlinks)

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        def write() -> None:
            with self.open_writer(key) as writer:
                writer.write(data)

        self._do(key, "write", write)

    def open_writer(self, key: str) -> StreamWriter:
        return self._do(key, "open writer for", lambda: _LocalWriter(self._path(key), self.url_of(key)))

    def create_exclusive(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def create() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = _temp_path_beside(path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, and fails if the target exists
            except FileExistsError:
                raise ObjectExistsError(
                    errno.EEXIST, f"cannot create {self.url_of(key)!r}: object already exists"
                ) from None
            finally:
                os.unlink(tmp)
            _fsync_dir(os.path.dirname(path))

        self._do(key, "create", create)

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        path = self._read_path(key)

        def read() -> bytes:
            with open(path, "rb") as f:
                if start:
                    f.seek(start)
                if end is None:
                    return f.read()
                return f.read(max(0, end - (start or 0)))

        return self._do(key, "read", read)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def is_file(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def info(self, key: str) -> ObjectInfo:
        path = self._read_path(key)
        st = self._do(key, "stat", lambda: os.stat(path))
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFoundError(errno.ENOENT, f"cannot stat {self.url_of(key)!r}: not an object")
        return _object_info(normalize_key(key), st)

    def list(self, prefix: str = "") -> builtins.list[str]:
        path = self._path(prefix)
        if not os.path.isdir(path):
            return []
        names = self._do(prefix, "list", lambda: os.listdir(path))
        return sorted(n for n in names if not n.startswith(TEMP_PREFIX))

    def walk(self, prefix: str = "") -> builtins.list[str]:
        return [info.key for info in self.list_objects(prefix)]

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        base = self._path(prefix)
        found: list[ObjectInfo] = []

        def scan(directory: str, rel: str) -> None:
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    continue
                key = join(rel, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    scan(entry.path, key)
                elif entry.is_file():
                    try:
                        found.append(_object_info(key, entry.stat()))
                    except FileNotFoundError:
                        pass  # deleted while listing

        self._do(prefix, "list", lambda: scan(base, ""))
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError as exc:
            if not missing_ok:
                raise_translated(exc, self.url_of(key), "delete")
        except OSError as exc:
            raise_translated(exc, self.url_of(key), "delete")

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if os.path.isdir(path):
            self._do(prefix, "delete", lambda: shutil.rmtree(path))
            _fsync_dir(os.path.dirname(path))
        elif os.path.isfile(path):
            self.delete(prefix)

    def local_path(self, key: str = "") -> str | None:
        """The file of ``key``; None for a symbolic link leading outside the root (reads of it are refused)."""
        path = self._path(key)
        return None if self._escapes(path) is not None else path
