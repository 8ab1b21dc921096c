"""Write and read one component's state dict as a ``torch.save`` file on any storage.

Saving streams ``torch.save`` straight into a storage writer (a multipart
upload on object stores) through a CRC32C-computing wrapper, so the state is
never serialized into one big in-memory buffer and the file's record (size,
checksum) comes for free. Nothing is visible until the file is complete.

Loading only ever uses ``torch.load(weights_only=True)``. Every state dict this
library meets loads that way without allow-listing anything (checked against
torch 2.13): Adam/AdamW/SGD optimizer state; StepLR, CosineAnnealingLR,
OneCycleLR and LambdaLR scheduler state (LambdaLR stores ``None`` for plain
functions and lambdas, which are not saved at all: the scheduler must be
rebuilt with the same lambdas before loading; a callable *object*'s
``__dict__`` is saved and must itself be weights-only loadable); torchdata's
``StatefulDataLoader`` state, with and without workers; ``TrainingProgress``
and ``RNGState``. Types outside the weights-only allowlist (NumPy arrays and
scalars, enums, namedtuples, ``defaultdict``, ``datetime``, ...) are refused
*at save*, with the path of the offending value, rather than discovered at
resume time; types registered with ``torch.serialization.add_safe_globals``
are accepted.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import zipfile
from collections.abc import Iterator
from typing import IO, Any, cast

import torch

from ckptio.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ObjectNotFoundError,
)
from ckptio.format.ranged_reads import read_object
from ckptio.format.torch_io import without_zip_checksums
from ckptio.format.writer import write_with_retries
from ckptio.storage import Storage, StreamWriter
from ckptio.storage.integrity import ChecksumWriter, FileRecord
from ckptio.storage.view_file import ViewFile

__all__ = ["load_component_state", "save_component_state", "unloadable_values"]

logger = logging.getLogger(__name__)

# Exact types torch.load(weights_only=True) rebuilds (tensors are checked separately).
_SAFE_LEAVES: tuple[type, ...] = (
    int, float, bool, complex, str, bytes, bytearray, type(None),
    torch.dtype, torch.device, torch.layout, torch.qscheme,
)  # fmt: skip
_SAFE_CONTAINERS: tuple[type, ...] = (dict, collections.OrderedDict, collections.Counter, list, tuple, set, torch.Size)


class _StreamFile:
    """The write-only file ``torch.save`` needs, over a storage writer.

    Remembers the first storage error: when a write fails, ``torch.save``'s
    clean-up writes the zip trailer and replaces that error with an unrelated
    ``RuntimeError``; the caller re-raises the real one.
    """

    def __init__(self, writer: StreamWriter) -> None:
        self._writer = writer
        self.error: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self._writer.write(data)
        except BaseException as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        """Nothing to do: the writer publishes on commit."""


def _walk(value: Any, path: str, allowed: tuple[type, ...], depth: int = 0) -> Iterator[tuple[str, type]]:
    """Yield ``(path, type)`` of every value ``weights_only`` loading would refuse."""
    kind = type(value)
    if isinstance(value, torch.Tensor) or kind in _SAFE_LEAVES or kind in allowed:
        return
    if kind not in _SAFE_CONTAINERS:
        yield path or "<root>", kind
        return
    if depth > 200:  # a cycle or absurd nesting: torch.save will report it
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(key, f"{path}.<key {key!r}>", allowed, depth + 1)
            yield from _walk(item, f"{path}.{key}" if path else str(key), allowed, depth + 1)
    else:
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}.{index}" if path else str(index), allowed, depth + 1)


def unloadable_values(state_dict: Any) -> list[tuple[str, type]]:
    """Return ``(dotted path, type)`` of each value ``torch.load(weights_only=True)`` would refuse.

    Types registered with ``torch.serialization.add_safe_globals`` (or an
    active ``safe_globals`` context) count as loadable.
    """
    registered: list[Any] = getattr(torch.serialization, "get_safe_globals", list)()  # torch >= 2.4
    allowed = tuple(t for t in registered if isinstance(t, type))
    return list(_walk(state_dict, "", allowed))


def save_component_state(storage: Storage, file_name: str, state_dict: Any) -> FileRecord:
    """Stream ``torch.save(state_dict)`` into ``file_name`` and return its size and CRC32C.

    The object appears only when complete (an earlier object of that name stays
    until then); a failed save leaves nothing.

    Raises:
        InvalidArgumentError: the state holds values ``weights_only`` loading
            would refuse (named by path); nothing is written.
        StorageError: the backend failed; nothing is published.
    """
    url = storage.url_of(file_name)
    refused = unloadable_values(state_dict)
    if refused:
        shown = ", ".join(f"{path!r} ({kind.__module__}.{kind.__qualname__})" for path, kind in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise InvalidArgumentError(
            f"cannot save {url!r}: torch.load(weights_only=True) could not load it back: {shown}{more}; "
            "convert these to tensors, numbers, strings, lists or dicts (or register the type with "
            "torch.serialization.add_safe_globals); nothing was written"
        )

    def write_once() -> FileRecord:
        writer = ChecksumWriter(storage.open_writer(file_name), file_name)
        with writer:
            stream = _StreamFile(writer)
            try:
                with without_zip_checksums():  # the manifest holds the file's CRC32C
                    torch.save(state_dict, stream)  # type: ignore[arg-type]  # any object with write()
            except BaseException as exc:
                if stream.error is not None and stream.error is not exc:
                    raise stream.error  # noqa: B904 - the storage failure, not torch's follow-up error
                raise
        if writer.record is None:  # pragma: no cover - commit always sets it
            raise RuntimeError(f"writer for {url!r} committed without a record")
        return writer.record

    # A stream cannot resume mid-way: a transient failure writes the whole file again.
    record = write_with_retries(storage, file_name, write_once)
    logger.debug("wrote %s (%d bytes)", url, record.size)
    return record


def load_component_state(
    storage: Storage, file_name: str, *, map_location: Any = "cpu", size: int | None = None
) -> Any:
    """Load a component file written by :func:`save_component_state`, with ``weights_only=True``.

    Args:
        storage: the checkpoint directory.
        file_name: the component file, relative to it.
        map_location: where tensors go, as for ``torch.load`` (default CPU).
        size: the file's size when known (from the manifest): on object stores
            a big file is then fetched in concurrent ranges from its first
            byte. Without it a big file's first 16 MiB come in one request,
            then its size and the rest; a small file is one request either way.

    Raises:
        IncompleteCheckpointError: the file does not exist.
        CorruptCheckpointError: truncated or corrupt, or an unsafe pickle
            (never executed); the file is left as it is.
    """
    url = storage.url_of(file_name)
    path = storage.local_path(file_name)
    try:
        source: str | IO[bytes]
        if path is not None:
            if not os.path.isfile(path):
                raise ObjectNotFoundError(f"{url!r} does not exist")
            source = path
        else:
            # Big files (optimizer state) come over several connections, into one buffer.
            source = cast(IO[bytes], ViewFile(read_object(storage, file_name, size=size)))
    except ObjectNotFoundError as exc:
        raise IncompleteCheckpointError(
            f"cannot load component state {url!r}: the file does not exist; the checkpoint is incomplete"
        ) from exc
    try:
        # A local file is mapped, not read: its pages are shared with the page cache (copy-on-write).
        state = torch.load(source, map_location=map_location, weights_only=True, mmap=isinstance(source, str))
    except pickle.UnpicklingError as exc:
        raise CorruptCheckpointError(
            f"refusing to load {url!r}: it holds objects torch.load(weights_only=True) will not rebuild "
            f"(an unsafe pickle, or a type not allow-listed): {exc}; nothing was executed or modified"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError, OSError) as exc:
        raise CorruptCheckpointError(
            f"cannot load {url!r}: not a readable torch.save file, truncated or corrupt "
            f"({type(exc).__name__}: {exc}); the file was not modified"
        ) from exc
    finally:
        if isinstance(source, ViewFile):
            source.release()  # the downloaded buffer, now, not at the next collection
    logger.debug("read %s", url)
    return state
