"""The exception tree of ckptio.

Every error ckptio raises derives from :class:`CkptioError`. Specific errors
also inherit the builtin they refine, so callers that already catch
``FileNotFoundError`` or ``ValueError`` keep working::

    CkptioError
    ├── StorageError (OSError)                 a backend operation failed
    │   ├── ObjectNotFoundError (FileNotFoundError)
    │   │   └── BucketNotFoundError                the bucket itself does not exist
    │   ├── ObjectExistsError (FileExistsError)    exclusive create lost the race
    │   ├── StoragePermissionError (PermissionError)
    │   ├── TransientStorageError                 retries exhausted on a transient fault
    │   └── InjectedFault                         a permanent fault from FaultInjectingStorage
    ├── MissingDependencyError (ImportError)   an optional extra is not installed
    ├── InvalidArgumentError (ValueError)      the caller passed something unusable
    ├── InsufficientMemoryError (MemoryError)  an async save's staging copy would not fit in host memory
    └── CheckpointError                        a checkpoint cannot be used
        ├── CheckpointNotFoundError (FileNotFoundError)  nothing to resume from
        ├── CheckpointExistsError (FileExistsError)  refusing to overwrite a complete one
        │   └── ConcurrentSaveError                another saver holds or took this checkpoint
        ├── CorruptCheckpointError (ValueError)    malformed or inconsistent content
        ├── IncompleteCheckpointError (FileNotFoundError)  a file it needs is missing
        ├── StateDictMismatchError (ValueError)    tensors do not fit the module
        ├── ReplicationMismatchError (ValueError)  a REPLICATED component differs across ranks
        └── WorldSizeMismatchError (ValueError)    per-rank state saved at another world size

    Outside the tree, for fault injection and warnings:

    TransientFault (ConnectionError)           an injected transient fault; retried like a 503
    SimulatedCrash (BaseException)             the simulated death of the process
    MissingComponentWarning (UserWarning)      an optional component was not restored
    RNGStateWarning (RuntimeWarning)           RNG state was restored only in part

Messages name the full URL of the object involved, what was wrong, and what is
still safe.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

__all__ = [
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CkptioError",
    "ConcurrentSaveError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "InjectedFault",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "MissingComponentWarning",
    "MissingDependencyError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "RNGStateWarning",
    "ReplicationMismatchError",
    "SimulatedCrash",
    "StateDictMismatchError",
    "StorageError",
    "StoragePermissionError",
    "TransientFault",
    "TransientStorageError",
    "WorldSizeMismatchError",
]


_E = TypeVar("_E", bound="CkptioError")


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """An exception of class ``cls`` with ``args`` and attributes ``state``, without calling ``__init__``."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class CkptioError(Exception):
    """Base class of every error raised by ckptio.

    Every ckptio error pickles with its attributes (so it can cross process
    boundaries intact) and can be copied with another message
    (:meth:`with_message`), keeping its class and attributes.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))

    def with_message(self: _E, message: str) -> _E:
        """A copy of this error, same class and attributes, whose message is ``message``."""
        errno = getattr(self, "errno", None)
        args = (errno, message) if isinstance(self, OSError) and errno is not None else (message,)
        return cast(_E, _rebuild(type(self), args, dict(self.__dict__)))


class StorageError(CkptioError, OSError):
    """A storage backend operation failed."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object or prefix does not exist."""


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket does not exist (S3 ``NoSuchBucket``, a GCS 404 on the bucket); never retried."""


class ObjectExistsError(StorageError, FileExistsError):
    """An exclusive create found the object already there."""


class StoragePermissionError(StorageError, PermissionError):
    """The backend refused access (bad credentials, 403)."""


class TransientStorageError(StorageError):
    """A transient fault (timeout, 5xx, throttling), or one that persisted past the retry budget.

    Attributes:
        retries_exhausted: True when a retry loop already spent its attempts on
            it, so that an outer layer does not retry it again.
    """

    retries_exhausted: bool = False


class InjectedFault(StorageError):
    """A permanent failure injected by :class:`~ckptio.storage.FaultInjectingStorage`."""


class MissingDependencyError(CkptioError, ImportError):
    """An optional dependency needed for this operation is not installed."""


class InvalidArgumentError(CkptioError, ValueError):
    """An argument cannot be used as given."""


class InsufficientMemoryError(CkptioError, MemoryError):
    """Host memory cannot hold what an operation must copy (an async save's staging copy)."""


class CheckpointError(CkptioError):
    """A checkpoint cannot be read or written as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint exists where one was asked for."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A complete checkpoint already exists at the target; it is left untouched."""


class ConcurrentSaveError(CheckpointExistsError):
    """Another saver is writing (or took over) the same checkpoint; this save wrote or committed nothing there."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's content is malformed, truncated or inconsistent."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """A file a checkpoint needs is missing."""


class StateDictMismatchError(CheckpointError, ValueError):
    """The checkpoint's tensors do not fit the module (names, shapes or dtypes)."""


class ReplicationMismatchError(CheckpointError, ValueError):
    """A REPLICATED component differs across ranks.

    Attributes:
        key: the component key.
        mismatches: ``(path, ranks)`` for each differing leaf, ``ranks`` being
            those whose copy differs from rank 0's.
        ranks: every rank that differs from rank 0 somewhere.
    """

    def __init__(self, message: str, *, key: str, mismatches: list[tuple[str, list[int]]]) -> None:
        super().__init__(message)
        self.key = key
        self.mismatches = mismatches
        self.ranks = sorted({r for _, ranks in mismatches for r in ranks})


class WorldSizeMismatchError(CheckpointError, ValueError):
    """Per-rank state was saved with a different world size."""


class TransientFault(ConnectionError):
    """A transient failure, raised by fault injection and recognised by :func:`ckptio.storage.is_transient`."""


class SimulatedCrash(BaseException):
    """The simulated death of the process; nothing after it reaches storage."""


class MissingComponentWarning(UserWarning):
    """An optional component could not be restored; it keeps its current state."""


class RNGStateWarning(RuntimeWarning):
    """Saved RNG state could only be restored in part (e.g. another number of CUDA devices)."""
