"""The Hugging Face shard index (``*.index.json``): parsing, validation, I/O.

An index is a dict ``{"metadata": {"total_size": int, ...}, "weight_map":
{tensor_name: shard_file}}``. It is validated before it is trusted: every
shard file must be a plain file name inside the checkpoint directory (no
``..``, no absolute path, no URL), so a crafted index can never make ckptio
read or delete anything outside the checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ckptio.errors import CorruptCheckpointError
from ckptio.format import strict_json
from ckptio.storage import Storage, normalize_key, resolve_storage

__all__ = [
    "index_shard_files",
    "load_shard_index",
    "parse_index",
    "read_index",
    "serialize_index",
    "validate_shard_file_name",
]


def validate_shard_file_name(name: object, url: str) -> str:
    """Return ``name`` if it is a safe relative file name inside the checkpoint.

    Raises:
        CorruptCheckpointError: the name is not a string, is absolute, is a URL,
            or climbs out of the directory.
    """
    if not isinstance(name, str) or not name:
        raise CorruptCheckpointError(f"index {url!r} names a shard {name!r}: not a file name")
    bad = (
        "://" in name
        or name.startswith(("/", "\\", "~"))
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or ".." in name.split("/")
    )
    if bad or normalize_key(name) != name:
        raise CorruptCheckpointError(
            f"index {url!r} names shard {name!r}, which is outside the checkpoint directory; refusing to read it"
        )
    return name


def parse_index(raw: bytes | str, url: str) -> dict[str, Any]:
    """Parse and validate index JSON read from ``url``.

    Raises:
        CorruptCheckpointError: malformed JSON (a tensor mapped twice included),
            a missing or mistyped ``weight_map``, or a shard name outside the directory.
    """
    try:
        index = strict_json.loads(raw)
    except ValueError as exc:  # malformed, not UTF-8, a key given twice, nested too deep
        raise CorruptCheckpointError(f"cannot parse index {url!r}: {exc}; the file was not modified") from exc
    if not isinstance(index, dict):
        raise CorruptCheckpointError(f"index {url!r} is not a JSON object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"index {url!r} has no 'weight_map' object")
    for tensor_name, shard in weight_map.items():
        validate_shard_file_name(shard, url)
        if not isinstance(tensor_name, str):
            raise CorruptCheckpointError(f"index {url!r} has a non-string tensor name {tensor_name!r}")
    metadata = index.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(f"index {url!r} has 'metadata' that is not an object")
    return index


def serialize_index(index: dict[str, Any]) -> bytes:
    """Index JSON as transformers writes it (indented, keys of weight_map sorted)."""
    out = {
        "metadata": index.get("metadata", {}),
        "weight_map": dict(sorted(index["weight_map"].items())),
    }
    return (json.dumps(out, indent=2, sort_keys=False) + "\n").encode()


def index_shard_files(index: dict[str, Any]) -> list[str]:
    """The distinct shard files an index names, sorted."""
    return sorted(set(index["weight_map"].values()))


def read_index(storage: Storage, key: str) -> dict[str, Any]:
    """Read and validate the index object ``key`` of ``storage``."""
    return parse_index(storage.read_bytes(key), storage.url_of(key))


def load_shard_index(
    model_dir: str | os.PathLike[str] | Storage,
    index_name: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read and validate ``<model_dir>/<index_name>``.

    Raises:
        ObjectNotFoundError: no such index.
        CorruptCheckpointError: the index is malformed or unsafe.
    """
    return read_index(resolve_storage(model_dir, storage_options), index_name)
