"""The exception tree of ckptio.

Every error ckptio raises derives from :class:`CkptioError`. Specific errors
also inherit the builtin they refine, so callers that already catch
``FileNotFoundError`` or ``ValueError`` keep working::

    CkptioError
    ├── StorageError (OSError)                 a backend operation failed
    │   ├── ObjectNotFoundError (FileNotFoundError)
    │   ├── ObjectExistsError (FileExistsError)    exclusive create lost the race
    │   ├── StoragePermissionError (PermissionError)
    │   └── TransientStorageError                 retries exhausted on a transient fault
    ├── MissingDependencyError (ImportError)   an optional extra is not installed
    ├── InvalidArgumentError (ValueError)      the caller passed something unusable
    └── CheckpointError                        a checkpoint cannot be used
        ├── CheckpointNotFoundError (FileNotFoundError)  nothing to resume from
        ├── CheckpointExistsError (FileExistsError)  refusing to overwrite a complete one
        ├── CorruptCheckpointError (ValueError)    malformed or inconsistent content
        ├── IncompleteCheckpointError (FileNotFoundError)  a file it needs is missing
        └── WorldSizeMismatchError (ValueError)    per-rank state saved at another world size

Messages name the full URL of the object involved, what was wrong, and what is
still safe.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CkptioError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "InvalidArgumentError",
    "MissingDependencyError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "StorageError",
    "StoragePermissionError",
    "TransientStorageError",
    "WorldSizeMismatchError",
]


class CkptioError(Exception):
    """Base class of every error raised by ckptio."""


class StorageError(CkptioError, OSError):
    """A storage backend operation failed."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object or prefix does not exist."""


class ObjectExistsError(StorageError, FileExistsError):
    """An exclusive create found the object already there."""


class StoragePermissionError(StorageError, PermissionError):
    """The backend refused access (bad credentials, 403)."""


class TransientStorageError(StorageError):
    """A transient fault (timeout, 5xx, throttling) persisted past the retry budget."""


class MissingDependencyError(CkptioError, ImportError):
    """An optional dependency needed for this operation is not installed."""


class InvalidArgumentError(CkptioError, ValueError):
    """An argument cannot be used as given."""


class CheckpointError(CkptioError):
    """A checkpoint cannot be read or written as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint exists where one was asked for."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A complete checkpoint already exists at the target; it is left untouched."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's content is malformed, truncated or inconsistent."""


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """A file a checkpoint needs is missing."""


class WorldSizeMismatchError(CheckpointError, ValueError):
    """Per-rank state was saved with a different world size."""
