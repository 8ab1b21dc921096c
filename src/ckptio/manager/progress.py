"""Progress of the manager's saves and loads (``CheckpointConfig.progress``), through a storage wrapper.

A save reports the bytes of every file it writes into the checkpoint (the
in-progress marker and the manifest, bookkeeping, are not counted), with no
total known in advance: it ends at the sum of the sizes the manifest lists.
A load of a committed checkpoint reports the bytes it reads against the
total its manifest lists (files this rank does not need, such as other
ranks' state or ``eval_metrics.json``, are not read). Each save and each load
is one operation whose ``bytes_done`` starts from 0. Every rank reports its own
bytes; the tqdm bar of ``progress=True`` shows on global rank 0 only.
"""

from __future__ import annotations

import torch.distributed as dist

from ckptio.checkpoint.layout import IN_PROGRESS_NAME, MANIFEST_NAME, METRICS_NAME
from ckptio.checkpoint.manifest import CheckpointManifest
from ckptio.storage import Storage
from ckptio.storage.progress import (
    ProgressCallback,
    ProgressCounter,
    ProgressStorage,
    progress_callback,
)

__all__ = ["with_progress"]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def with_progress(
    storage: Storage,
    progress: bool | ProgressCallback | None,
    *,
    manifest: CheckpointManifest | None = None,
) -> Storage:
    """``storage`` reporting a load's reads (given the checkpoint's ``manifest``) or a save's writes
    to the callback ``progress`` asks for; ``storage`` itself when it asks for none."""
    callback = progress_callback(progress, rank=_rank())
    if callback is None:
        return storage
    ignore = {storage.url_of(name) for name in (IN_PROGRESS_NAME, MANIFEST_NAME)}
    if manifest is None:
        return ProgressStorage(
            storage,
            ProgressCounter("save", storage.url, callback, ignore=ignore),
            writes=True,
        )
    sizes = {storage.url_of(r.path): r.size for r in manifest.files if r.path != METRICS_NAME}
    counter = ProgressCounter(
        "load",
        storage.url,
        callback,
        total=sum(sizes.values()),
        sizes=sizes,
        ignore=ignore,
    )
    return ProgressStorage(storage, counter, reads=True)
