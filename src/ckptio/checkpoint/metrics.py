"""Evaluation metrics stored beside a checkpoint (``eval_metrics.json``).

Metrics are plain JSON: strings, booleans, null, finite numbers, and lists
and objects of those. NaN and infinity are refused when saving (JSON has no
such values and most readers reject them) and when loading.

When a committed checkpoint's manifest lists ``eval_metrics.json``, saving new
metrics keeps the manifest true to the bytes without ever making the
checkpoint look incomplete: the manifest is first rewritten without the
metrics record, then the metrics are written, then the manifest is rewritten
with the new record. A crash between any two steps leaves a complete
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any

from ckptio.checkpoint.layout import METRICS_NAME
from ckptio.checkpoint.manifest import read_manifest, strict_json_loads, write_manifest
from ckptio.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    ObjectNotFoundError,
)
from ckptio.storage import Storage, resolve_storage
from ckptio.storage.integrity import FileRecord, checksum_bytes

__all__ = ["decode_metrics", "encode_metrics", "load_checkpoint_metrics", "save_checkpoint_metrics"]


def _plain(value: object, where: str, url: str) -> Any:
    """``value`` as plain JSON data, or InvalidArgumentError naming ``where``."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise InvalidArgumentError(
                f"cannot save metrics to {url!r}: {where} is {number}; JSON has no NaN or infinity"
            )
        return number
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(f"cannot save metrics to {url!r}: {where} has a non-string key {key!r}")
            out[key] = _plain(item, f"{where}[{key!r}]", url)
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]", url) for i, item in enumerate(value)]
    raise InvalidArgumentError(
        f"cannot save metrics to {url!r}: {where} is a {type(value).__name__} ({value!r}), not a JSON value; "
        "pass a number (e.g. float(tensor)) or a string"
    )


def encode_metrics(metrics: dict[str, Any], *, url: str = METRICS_NAME) -> bytes:
    """Return ``metrics`` as ``eval_metrics.json`` bytes (sorted keys, so equal metrics give equal bytes).

    Raises:
        InvalidArgumentError: ``metrics`` is not a dict with string keys, or a
            value is non-finite or not JSON; the message names the key.
    """
    if not isinstance(metrics, dict):
        raise InvalidArgumentError(f"cannot save metrics to {url!r}: expected a dict, got {type(metrics).__name__}")
    plain = _plain(metrics, "metrics", url)
    return (json.dumps(plain, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def decode_metrics(raw: bytes, *, url: str = METRICS_NAME) -> dict[str, Any]:
    """Parse ``eval_metrics.json`` bytes read from ``url``.

    Raises:
        CorruptCheckpointError: not UTF-8 JSON, not an object, or holds NaN/infinity.
    """
    try:
        metrics = strict_json_loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCheckpointError(f"cannot read metrics {url!r}: {exc}; nothing was changed") from exc
    if not isinstance(metrics, dict):
        raise CorruptCheckpointError(
            f"cannot read metrics {url!r}: expected a JSON object, got {type(metrics).__name__}; nothing was changed"
        )
    return metrics


def save_checkpoint_metrics(
    checkpoint_path: str | os.PathLike[str] | Storage,
    metrics: dict[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write ``metrics`` to ``<checkpoint_path>/eval_metrics.json`` atomically.

    Replaces earlier metrics. If the checkpoint is committed and its manifest
    lists the metrics file, the manifest is updated too, in an order that
    keeps the checkpoint complete at every step (see the module docstring).

    Raises:
        InvalidArgumentError: a value is non-finite or not JSON (names the key); nothing is written.
        CorruptCheckpointError: the checkpoint's manifest is malformed; nothing is written.
    """
    storage = resolve_storage(checkpoint_path, storage_options)
    data = encode_metrics(metrics, url=storage.url_of(METRICS_NAME))
    manifest = read_manifest(storage)
    listed = manifest.file_record(METRICS_NAME) if manifest is not None else None
    if manifest is None or listed is None:
        storage.write_bytes(METRICS_NAME, data)
        return
    record = FileRecord(METRICS_NAME, len(data), checksum_bytes(data))
    if record == listed:
        storage.write_bytes(METRICS_NAME, data)  # same bytes: the manifest stays true
        return
    others = [r for r in manifest.files if r.path != METRICS_NAME]
    write_manifest(storage, dataclasses.replace(manifest, files=others))
    storage.write_bytes(METRICS_NAME, data)
    write_manifest(storage, dataclasses.replace(manifest, files=sorted([*others, record], key=lambda r: r.path)))


def load_checkpoint_metrics(
    checkpoint_path: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Read ``<checkpoint_path>/eval_metrics.json``.

    Returns:
        The metrics, or None when the checkpoint has none.

    Raises:
        CorruptCheckpointError: the file is malformed (names its URL).
    """
    storage = resolve_storage(checkpoint_path, storage_options)
    try:
        raw = storage.read_bytes(METRICS_NAME)
    except ObjectNotFoundError:
        return None
    return decode_metrics(raw, url=storage.url_of(METRICS_NAME))
