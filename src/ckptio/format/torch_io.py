"""PyTorch ``.bin`` shards: streamed ``torch.save`` out, ``weights_only`` ``torch.load`` in.

``torch.save`` writes its zip archive sequentially, so it streams straight into
a storage writer (a multipart upload on object stores): tensor data goes out
from the tensors' own memory, in slices. torch's zip writer turns an exception
raised by the file it writes to into a bare ``RuntimeError``; the storage error
is kept and raised instead, so it names the object and can be retried when
transient. Loading is only ever done with
``weights_only=True``; a file that needs arbitrary pickled objects is refused
as corrupt rather than executed. Local files load by mmap; on object stores a
big file is fetched with concurrent ranged reads into one buffer
(:func:`~ckptio.format.ranged_reads.read_object`), a small one in one request.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, NoReturn, cast

import torch
import torch.utils.serialization

from ckptio.errors import CkptioError, CorruptCheckpointError
from ckptio.format.ranged_reads import read_object
from ckptio.storage import Storage, StreamWriter
from ckptio.storage.integrity import ChecksumWriter, FileRecord
from ckptio.storage.retry import translate_error
from ckptio.storage.view_file import ViewFile

__all__ = ["read_torch_file", "write_torch_file"]

_WRITE_CHUNK = 8 * 2**20
_ZIP_MAGIC = b"PK\x03\x04"


class _WriterFile:
    """The file-like object ``torch.save`` needs (``write``/``flush``) over a StreamWriter.

    Keeps the first exception a write raised (``error``): torch's zip writer
    replaces it with a ``RuntimeError`` that names neither the object nor the cause.
    """

    def __init__(self, writer: StreamWriter) -> None:
        self._writer = writer
        self.error: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is not None:
            raise self.error  # the stream is broken: never write past a failure
        view = memoryview(data).cast("B")
        try:
            for start in range(0, view.nbytes, _WRITE_CHUNK):
                self._writer.write(view[start : start + _WRITE_CHUNK])
        except BaseException as exc:
            self.error = exc
            raise
        return view.nbytes

    def flush(self) -> None:
        """Nothing to flush: the storage writer publishes on commit."""


@contextlib.contextmanager
def without_zip_checksums() -> Iterator[None]:
    """Let ``torch.save`` in this thread skip the zip CRC32 of every record.

    That checksum costs about as long as writing the bytes to a fast disk,
    ``torch.load`` never checks it, and ckptio records its own CRC32C of every
    file in the manifest. torch keeps the setting per thread; it is restored
    on exit, so the caller's own ``torch.save`` calls are unaffected.
    """
    config = torch.utils.serialization.config.save
    before = config.compute_crc32
    config.compute_crc32 = False
    try:
        yield
    finally:
        config.compute_crc32 = before


def _saveable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor to pickle: detached, and a compact copy when it views a larger storage.

    ``torch.save`` writes a tensor's *whole* storage, so a slice of a big tensor
    would drag all of it into the shard.
    """
    tensor = tensor.detach()
    if (
        type(tensor) is torch.Tensor
        and tensor.device.type != "meta"
        and tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()
    ):
        tensor = tensor.clone()
    return tensor


def _raise_write_failure(error: BaseException, url: str) -> NoReturn:
    """Raise the storage's own error for a failed stream, as a ckptio error naming ``url``."""
    if isinstance(error, CkptioError) or not isinstance(error, Exception):
        raise error  # already names the object (its cause chained); a SimulatedCrash stays a crash
    raise translate_error(error, url, "write") from error


def write_torch_file(storage: Storage, key: str, tensors: Mapping[str, torch.Tensor]) -> FileRecord:
    """Stream ``torch.save(tensors)`` into object ``key``; publish it only when complete.

    Raises:
        StorageError: the storage failed mid-stream (naming the object; the
            previous object of that name, if any, is untouched).
    """
    url = storage.url_of(key)
    payload = {name: _saveable(t) for name, t in tensors.items()}
    writer = ChecksumWriter(storage.open_writer(key), key)
    file = _WriterFile(writer)
    with writer:
        try:
            with without_zip_checksums():
                torch.save(payload, cast(IO[bytes], file))
        except Exception:
            if file.error is None:
                raise
        # Outside the handler: torch's "unexpected pos" RuntimeError only adds noise to the chain.
        if file.error is not None:
            _raise_write_failure(file.error, url)  # inside the with block: the stream is aborted
    if writer.record is None:  # pragma: no cover - commit always sets it
        raise RuntimeError(f"writer for {url!r} committed without a record")
    return writer.record


def _load(source: str | IO[bytes], url: str, device: str | torch.device, *, mmap: bool) -> Any:
    try:
        return torch.load(source, map_location=torch.device(device), weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CorruptCheckpointError(
            f"refusing to load {url!r}: it cannot be loaded with weights_only=True (an unsafe pickle, "
            f"or a tensor type whose package is not imported): {exc}; the file was not modified"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as exc:
        raise CorruptCheckpointError(
            f"cannot load {url!r}: not a readable PyTorch file ({type(exc).__name__}: {exc}); the file was not modified"
        ) from exc


def read_torch_file(
    storage: Storage,
    key: str,
    names: Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Load a ``.bin``/``.pt`` state dict with ``weights_only=True``; keep ``names`` (all when None).

    On object stores a file of 16 MiB or more comes over several connections
    (:func:`~ckptio.format.ranged_reads.read_object`; ``size``, when known,
    saves the request that sizes it); a smaller one is one request.

    Raises:
        ObjectNotFoundError: the file does not exist.
        CorruptCheckpointError: unreadable, an unsafe pickle, not a dict of
            tensors, or missing a name the index promised.
    """
    url = storage.url_of(key)
    path = storage.local_path(key)
    if path is not None and os.path.isfile(path):
        with open(path, "rb") as file:
            is_zip = file.read(4) == _ZIP_MAGIC
        loaded = _load(path, url, device, mmap=is_zip)
    else:
        downloaded = ViewFile(read_object(storage, key, size=size))
        try:
            loaded = _load(cast(IO[bytes], downloaded), url, device, mmap=False)
        finally:
            downloaded.release()  # the downloaded object, now
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CorruptCheckpointError(f"cannot load {url!r}: expected a dict of tensors, got {type(loaded).__name__}")
    if names is None:
        return loaded
    wanted = list(names)
    absent = [n for n in wanted if n not in loaded]
    if absent:
        raise CorruptCheckpointError(f"shard {url!r} does not hold {absent} although the index says it does")
    return {n: loaded[n] for n in wanted}
