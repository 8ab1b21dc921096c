"""The commands that move bytes, ``cp``, ``export`` and ``convert``, and their progress bars.

A progress bar (tqdm, from ``ckptio[all]``, imported only when one is shown)
goes to stderr when stderr is a terminal; ``--progress`` forces one,
``--no-progress`` turns it off.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ckptio.checkpoint.copy import copy_checkpoint
from ckptio.cli.output import format_size
from ckptio.errors import CkptioError
from ckptio.format import weight_files
from ckptio.manager.convert import convert_checkpoint
from ckptio.manager.export import export_checkpoint
from ckptio.storage import CountingStorage, ProgressEvent, Storage, open_storage

__all__ = ["ProgressBar", "cmd_convert", "cmd_cp", "cmd_export", "progress_bar", "show_progress"]

logger = logging.getLogger(__name__)


class ProgressBar:
    """A byte-counting tqdm bar on stderr, created on :meth:`start`; safe to advance from several threads."""

    def __init__(self, tqdm: Any, description: str) -> None:
        self._tqdm = tqdm
        self._description = description
        self._bar: Any = None
        self._lock = threading.Lock()

    def start(self, total_bytes: int | None) -> None:
        """Show the bar, for ``total_bytes`` (None: a counter without a total)."""
        with self._lock:
            if self._bar is None:
                self._bar = self._tqdm(
                    total=total_bytes,
                    desc=self._description,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more."""
        self.start(None)
        with self._lock:
            self._bar.update(nbytes)

    def finish(self) -> None:
        """Mark the work done: an estimated total becomes the bytes counted."""
        with self._lock:
            if self._bar is not None and self._bar.total != self._bar.n:
                self._bar.total = self._bar.n
                self._bar.refresh()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()


def show_progress(requested: bool | None) -> bool:
    """``--progress`` / ``--no-progress`` when given, else whether stderr is a terminal."""
    if requested is not None:
        return requested
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


@contextmanager
def progress_bar(enabled: bool, description: str) -> Iterator[ProgressBar | None]:
    """A :class:`ProgressBar` when enabled and tqdm is installed, else None."""
    if not enabled:
        yield None
        return
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        logger.warning("no progress bar: tqdm is not installed (pip install 'ckptio[all]')")
        yield None
        return
    bar = ProgressBar(tqdm, description)
    try:
        yield bar
    finally:
        bar.close()


def _dst_options(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    dst: dict[str, Any] | None = getattr(args, "dst_options", None)
    return options if dst is None else dst


def cmd_cp(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Copy a complete checkpoint to another storage (resumable, manifest last); see :mod:`ckptio.checkpoint.copy`."""
    src = open_storage(args.src, **options)
    dst = open_storage(args.dst, **_dst_options(args, options))
    with progress_bar(show_progress(args.progress), "cp") as bar:
        result = copy_checkpoint(src, dst, overwrite=args.overwrite, progress=bar)
    line = f"copied {len(result.copied)} files ({format_size(result.bytes_copied)}) to {result.url}"
    if result.reused:
        line += f"; {len(result.reused)} files already there"
    print(line)
    return 0


class _WriteProgress(CountingStorage):
    """Shows the bytes written through it (and its children) on a progress bar."""

    def __init__(self, inner: Storage, bar: ProgressBar, *, _shared: CountingStorage | None = None) -> None:
        super().__init__(inner, _shared=_shared)
        self.bar = bar

    def rewrap(self, inner: Storage) -> _WriteProgress:
        return _WriteProgress(inner, self.bar, _shared=self._root_counter())

    def add(self, *, read: int = 0, written: int = 0) -> None:
        super().add(read=read, written=written)
        if written:
            self.bar.advance(written)


def _weights_size(storage: Storage) -> int | None:
    """Bytes of the weight files of a checkpoint: about what an export writes (None for sharded state)."""
    try:
        files = weight_files(storage)
    except CkptioError:
        return None  # export says what is wrong with it
    if files is None:
        return None
    sizes = {o.key: o.size for o in storage.list_objects("")}
    return sum(sizes.get(f, 0) for f in files if not f.endswith(".index.json"))


def cmd_export(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Write a committed checkpoint's model as a plain Hugging Face safetensors directory."""
    dst: Storage = open_storage(args.dst, **_dst_options(args, options))
    with progress_bar(show_progress(args.progress), "export") as bar:
        if bar is not None:
            bar.start(_weights_size(open_storage(args.ckpt, **options)))
            dst = _WriteProgress(dst, bar)
        records = export_checkpoint(
            args.ckpt,
            dst,
            storage_options=options,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
        if bar is not None:
            bar.finish()
    print(f"exported {len(records)} files ({format_size(sum(r.size for r in records))}) to {args.dst}")
    return 0


class _BarCallback:
    """A :data:`~ckptio.storage.ProgressCallback` advancing a :class:`ProgressBar` by each event's new bytes."""

    def __init__(self, bar: ProgressBar) -> None:
        self.bar = bar
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            delta, self.done = event.bytes_done - self.done, max(self.done, event.bytes_done)
        if delta > 0:
            self.bar.advance(delta)


def cmd_convert(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Write the weights of a checkpoint or model directory to a new directory as safetensors or ``.bin``."""
    with progress_bar(show_progress(args.progress), "convert") as bar:
        if bar is not None:
            bar.start(_weights_size(open_storage(args.path, **options)))
        records = convert_checkpoint(
            args.path,
            args.dst,
            to=args.to,
            storage_options=options,
            dst_storage_options=_dst_options(args, options),
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=_BarCallback(bar) if bar is not None else None,
        )
        if bar is not None:
            bar.finish()
    print(f"converted {len(records)} files ({format_size(sum(r.size for r in records))}) to {args.dst} ({args.to})")
    return 0
