"""The read-only commands and ``prune``: ``ls``, ``inspect``, ``verify``, ``latest``, ``prune``.

With ``--json`` the first four print one JSON document on stdout instead of
text; its keys are stable, sizes are in bytes and statuses are strings (see
``ckptio COMMAND --help``). Failures still exit 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ckptio.checkpoint import (
    CheckpointEntry,
    CheckpointManifest,
    CheckpointStatus,
    find_latest_checkpoint,
    inspect_checkpoint,
    list_checkpoints,
    maybe_delete_oldest_checkpoint,
    verify_checkpoint,
)
from ckptio.cli.output import format_size, print_json
from ckptio.errors import CheckpointError, CorruptCheckpointError
from ckptio.format import weight_files
from ckptio.format.index import read_index
from ckptio.format.safetensors_io import read_header
from ckptio.format.torch_io import read_torch_file
from ckptio.storage import Storage, open_storage

__all__ = ["cmd_inspect", "cmd_latest", "cmd_ls", "cmd_prune", "cmd_verify"]

logger = logging.getLogger(__name__)

#: One tensor of a weights file: name, dtype and shape (None when only an index names it), file.
TensorRow = tuple[str, str | None, list[int] | None, str]


def _entry_json(e: CheckpointEntry) -> dict[str, Any]:
    return {
        "name": e.name,
        "checkpoint_id": e.checkpoint_id,
        "url": e.url,
        "status": e.status.value,
        "complete": e.is_complete,
        "size_bytes": e.size_bytes,
        "timestamp": e.timestamp,
        "error": e.error,
    }


def cmd_ls(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Print one line per checkpoint under ``URL/checkpoints``, oldest first."""
    entries = list_checkpoints(args.url, storage_options=options)
    if args.json:
        print_json({"url": args.url, "checkpoints": [_entry_json(e) for e in entries]})
        return 0
    if not entries:
        print(f"no checkpoints under {args.url}", file=sys.stderr)
    for e in entries:
        step = "-" if e.checkpoint_id is None else str(e.checkpoint_id)
        status = "complete" if e.is_complete else "incomplete"
        print(f"{e.name}\t{step}\t{format_size(e.size_bytes)}\t{status}\t{e.timestamp or '-'}")
    return 0


def _tensors(storage: Storage, files: list[str]) -> tuple[dict[str, Any], list[TensorRow]]:
    """The index metadata and every tensor of the weight files, sorted by file then name (headers only)."""
    index = read_index(storage, files[0]) if files[0].endswith(".index.json") else None
    shards = files[1:] if index is not None else files
    rows: list[TensorRow] = []
    for shard in shards:
        found: list[TensorRow]
        if shard.endswith(".safetensors"):
            header = read_header(storage, shard)
            found = [(n, _dtype(e.dtype), list(e.shape), shard) for n, e in header.entries.items()]
        elif index is not None:  # pickled shard: the index names its tensors, no need to unpickle
            found = [(n, None, None, shard) for n, f in index["weight_map"].items() if f == shard]
        else:
            tensors = read_torch_file(storage, shard)
            found = [(n, _dtype(t.dtype), list(t.shape), shard) for n, t in tensors.items()]
        rows += sorted(found)
    return (dict(index["metadata"]) if index is not None else {}), rows


def _dtype(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _manifest_json(manifest: CheckpointManifest) -> dict[str, Any]:
    return {
        "checkpoint_id": manifest.checkpoint_id,
        "checkpoint_path": manifest.checkpoint_path,
        "timestamp": manifest.timestamp,
        "world_size": manifest.world_size,
        "format_version": manifest.format_version,
        "library_version": manifest.library_version,
        "torch_version": manifest.torch_version,
        "size_bytes": manifest.total_size,
        "file_count": len(manifest.files),
        "metadata": manifest.metadata,
        "components": [
            {
                "key": c.key,
                "sharing_pattern": c.sharing_pattern,
                "ranks": list(c.ranks),
                "size_bytes": c.size_bytes,
                "files": list(c.files),
            }
            for c in manifest.components.values()
        ],
        "files": [{"path": r.path, "size_bytes": r.size, "crc32c": r.crc32c} for r in manifest.files],
    }


def cmd_inspect(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Print a checkpoint's status, manifest, components, and tensors (name, dtype, shape)."""
    storage = open_storage(args.path, **options)
    inspection = inspect_checkpoint(storage)
    if inspection.status is CheckpointStatus.NOT_A_CHECKPOINT and not inspection.keys:
        raise CheckpointError(f"{storage.url} holds no objects; nothing to inspect")
    manifest = inspection.manifest
    files = weight_files(storage)
    index_metadata, tensors = _tensors(storage, files) if files is not None else ({}, [])
    if args.json:
        weights = None
        if files is not None:
            rows = [{"name": n, "dtype": d, "shape": s, "file": f} for n, d, s, f in tensors]
            weights = {"files": files, "index_metadata": index_metadata, "tensors": rows}
        print_json(
            {
                "url": storage.url,
                "status": inspection.status.value,
                "problems": list(inspection.problems),
                "manifest": _manifest_json(manifest) if manifest is not None else None,
                "weights": weights,
            }
        )
        return 0
    print(f"{storage.url}: {inspection.status.value}")
    for problem in inspection.problems:
        print(f"  problem: {problem}")
    if manifest is not None:
        print(f"checkpoint_id: {manifest.checkpoint_id}")
        print(f"timestamp: {manifest.timestamp}")
        print(f"world_size: {manifest.world_size}")
        print(f"size: {format_size(manifest.total_size)} in {len(manifest.files)} files")
        print(f"written by: ckptio {manifest.library_version}, torch {manifest.torch_version}")
        if manifest.metadata:
            print(f"metadata: {json.dumps(manifest.metadata, sort_keys=True)}")
        print(f"components ({len(manifest.components)}):")
        for c in manifest.components.values():
            ranks = ",".join(map(str, c.ranks))
            print(f"  {c.key}\t{c.sharing_pattern}\tranks {ranks}\t{format_size(c.size_bytes)}\t{len(c.files)} files")
    if files is None:
        print("weights: none")
        return 0
    print(f"weights ({', '.join(files)}):")
    for key, value in sorted(index_metadata.items()):
        print(f"  index metadata: {key} = {json.dumps(value)}")
    for name, dtype, shape, shard in tensors:
        print(f"  {name}\t{dtype or '?'}\t{'?' if shape is None else shape}\t{shard}")
    return 0


def cmd_verify(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Check every file's presence, size and CRC32C; print the problems and exit 1 if any."""
    problems = verify_checkpoint(args.path, storage_options=options)
    if args.json:
        print_json({"url": args.path, "ok": not problems, "problems": problems})
    else:
        for problem in problems:
            print(problem)
    if problems:
        raise CorruptCheckpointError(f"{args.path}: {len(problems)} problem(s) found (listed on stdout)")
    if not args.json:
        print(f"ok: {args.path}")
    return 0


def cmd_latest(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Print the newest complete checkpoint under ``URL``."""
    latest = find_latest_checkpoint(args.url, storage_options=options)
    if args.json:
        print_json({"url": args.url, "latest": latest})
    if latest is None:
        raise CheckpointError(f"no complete checkpoint under {args.url}")
    if not args.json:
        print(latest)
    return 0


def cmd_prune(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Delete all but the newest ``--keep`` complete checkpoints; print the deleted names."""
    for name in maybe_delete_oldest_checkpoint(args.url, args.keep, storage_options=options):
        print(name)
    return 0
