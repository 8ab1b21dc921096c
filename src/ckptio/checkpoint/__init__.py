"""The checkpoint directory: layout, manifest, commit protocol, validity, discovery, rotation, metrics.

This layer knows how a checkpoint directory is laid out and when it counts as
complete; it never writes model weights itself (that is :mod:`ckptio.format`).
Every function taking a directory accepts a local path, an fsspec URL or a
:class:`~ckptio.storage.Storage`, plus ``storage_options=``.
"""

from __future__ import annotations

from ckptio.checkpoint.commit import (
    begin_checkpoint,
    commit_checkpoint,
    delete_checkpoint,
    is_committed,
)
from ckptio.checkpoint.discovery import (
    CheckpointEntry,
    CheckpointScan,
    entry_sort_key,
    find_latest_checkpoint,
    list_checkpoints,
    scan_checkpoints,
    scan_latest_complete,
)
from ckptio.checkpoint.layout import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    METRICS_NAME,
    checkpoint_dir_name,
    checkpoint_key,
    is_checkpoint_file,
    join_location,
    location_name,
    next_checkpoint_path,
    parse_checkpoint_id,
)
from ckptio.checkpoint.manifest import (
    FORMAT_VERSION,
    SHARING_PATTERN_VALUES,
    CheckpointManifest,
    ComponentManifest,
    parse_timestamp,
    read_manifest,
    utc_timestamp,
    write_manifest,
)
from ckptio.checkpoint.metrics import (
    decode_metrics,
    encode_metrics,
    load_checkpoint_metrics,
    save_checkpoint_metrics,
)
from ckptio.checkpoint.retention import (
    checkpoint_names,
    maybe_delete_oldest_checkpoint,
    rotate_checkpoints,
    select_for_deletion,
)
from ckptio.checkpoint.validate import (
    CheckpointInspection,
    CheckpointStatus,
    checkpoint_status,
    inspect_checkpoint,
    validate_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_PREFIX",
    "FORMAT_VERSION",
    "IN_PROGRESS_NAME",
    "MANIFEST_NAME",
    "METRICS_NAME",
    "SHARING_PATTERN_VALUES",
    "CheckpointEntry",
    "CheckpointInspection",
    "CheckpointManifest",
    "CheckpointScan",
    "CheckpointStatus",
    "ComponentManifest",
    "begin_checkpoint",
    "checkpoint_dir_name",
    "checkpoint_key",
    "checkpoint_names",
    "checkpoint_status",
    "commit_checkpoint",
    "decode_metrics",
    "delete_checkpoint",
    "encode_metrics",
    "entry_sort_key",
    "find_latest_checkpoint",
    "inspect_checkpoint",
    "is_checkpoint_file",
    "is_committed",
    "join_location",
    "location_name",
    "list_checkpoints",
    "load_checkpoint_metrics",
    "maybe_delete_oldest_checkpoint",
    "next_checkpoint_path",
    "parse_checkpoint_id",
    "parse_timestamp",
    "read_manifest",
    "rotate_checkpoints",
    "save_checkpoint_metrics",
    "scan_checkpoints",
    "scan_latest_complete",
    "select_for_deletion",
    "utc_timestamp",
    "validate_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]
