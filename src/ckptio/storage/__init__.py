"""Byte-oriented storage over local disk and every fsspec backend.

``open_storage(url_or_path, **storage_options)`` returns a :class:`Storage`
rooted at that location; everything else in ckptio reads and writes through
it. This package never imports torch.
"""

from __future__ import annotations

from ckptio.storage.base import ObjectInfo, Storage, StreamWriter, join, normalize_key
from ckptio.storage.faults import FaultInjectingStorage, InjectedFault, SimulatedCrash
from ckptio.storage.local import LocalStorage
from ckptio.storage.progress import ProgressCallback, ProgressEvent, ProgressStorage
from ckptio.storage.registry import open_storage, resolve_storage, split_url
from ckptio.storage.retry import RetryPolicy, TransientFault, is_transient
from ckptio.storage.wrapper import (
    CountingStorage,
    KnownObjectsStorage,
    RetryingStorage,
    StorageWrapper,
)

__all__ = [
    "CountingStorage",
    "FaultInjectingStorage",
    "InjectedFault",
    "KnownObjectsStorage",
    "LocalStorage",
    "ObjectInfo",
    "ProgressCallback",
    "ProgressEvent",
    "ProgressStorage",
    "RetryPolicy",
    "RetryingStorage",
    "SimulatedCrash",
    "Storage",
    "StorageWrapper",
    "StreamWriter",
    "TransientFault",
    "is_transient",
    "join",
    "normalize_key",
    "open_storage",
    "resolve_storage",
    "split_url",
]
