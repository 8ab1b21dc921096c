"""ckptio: crash-safe PyTorch checkpoints on local disk, S3, GCS or any fsspec URL.

* Model weights as Hugging Face shards: :func:`save_checkpoint`, :func:`load_checkpoint`, ...
* Whole training state: :class:`CheckpointManager` with :class:`CheckpointConfig`.
* Checkpoint directories: :func:`find_latest_checkpoint`, :func:`validate_checkpoint`, rotation.
* Storage: :func:`open_storage` (see :mod:`ckptio.storage`); errors in :mod:`ckptio.errors`.
"""

from __future__ import annotations

from ckptio._version import __version__
from ckptio.checkpoint import (
    CheckpointManifest,
    CheckpointStatus,
    ComponentManifest,
    find_latest_checkpoint,
    load_checkpoint_metrics,
    maybe_delete_oldest_checkpoint,
    next_checkpoint_path,
    save_checkpoint_metrics,
    validate_checkpoint,
    verify_checkpoint,
)
from ckptio.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptioError,
    ConcurrentSaveError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InsufficientMemoryError,
    InvalidArgumentError,
    MissingDependencyError,
    ObjectNotFoundError,
    StorageError,
    WorldSizeMismatchError,
)
from ckptio.format import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointMeta,
    create_sharing_metadata,
    get_checkpoint_metadata,
    load_checkpoint,
    load_shard_index,
    load_sharded_checkpoint,
    make_shard_index,
    retie_parameters,
    save_checkpoint,
    save_shard_index,
    save_sharded_checkpoint,
)
from ckptio.manager import (
    CheckpointConfig,
    CheckpointInterface,
    CheckpointManager,
    MissingComponentWarning,
)
from ckptio.state import (
    RNGState,
    SharingPattern,
    StateComponent,
    Stateful,
    StatefulProvider,
    TrainingProgress,
    ValidationLevel,
)
from ckptio.storage import FaultInjectingStorage, Storage, open_storage

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInterface",
    "CheckpointManager",
    "CheckpointManifest",
    "CheckpointMeta",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "CkptioError",
    "ComponentManifest",
    "ConcurrentSaveError",
    "CorruptCheckpointError",
    "FaultInjectingStorage",
    "IncompleteCheckpointError",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "MissingComponentWarning",
    "MissingDependencyError",
    "ObjectNotFoundError",
    "RNGState",
    "SharingPattern",
    "StateComponent",
    "Stateful",
    "StatefulProvider",
    "Storage",
    "StorageError",
    "TrainingProgress",
    "ValidationLevel",
    "WorldSizeMismatchError",
    "__version__",
    "create_sharing_metadata",
    "find_latest_checkpoint",
    "get_checkpoint_metadata",
    "load_checkpoint",
    "load_checkpoint_metrics",
    "load_shard_index",
    "load_sharded_checkpoint",
    "make_shard_index",
    "maybe_delete_oldest_checkpoint",
    "next_checkpoint_path",
    "open_storage",
    "retie_parameters",
    "save_checkpoint",
    "save_checkpoint_metrics",
    "save_shard_index",
    "save_sharded_checkpoint",
    "validate_checkpoint",
    "verify_checkpoint",
]
