"""The checkpoint directory a DCP writer or reader works on (shared by both)."""

from __future__ import annotations

import os
from typing import Any

from ckptio.dcp.layout import is_checkpoint_location
from ckptio.storage import Storage, resolve_storage

__all__ = ["CheckpointTarget"]


class CheckpointTarget:
    """A checkpoint directory given as a path, a URL or a Storage, re-rooted by ``reset(checkpoint_id)``."""

    def __init__(self, path: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None) -> None:
        self._storage_options = dict(storage_options or {})
        self._storage = resolve_storage(path, self._storage_options)

    @property
    def checkpoint_id(self) -> str:
        """The URL (or local path) of the checkpoint directory."""
        return self._storage.url

    def _retarget(self, checkpoint_id: str | os.PathLike[str] | None) -> None:
        """Move to ``checkpoint_id`` (a path or URL, opened with the same storage options) when given."""
        if checkpoint_id is not None:
            self._storage = resolve_storage(checkpoint_id, self._storage_options)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a local path or a URL of a protocol fsspec knows (nothing is contacted)."""
        return is_checkpoint_location(checkpoint_id)
