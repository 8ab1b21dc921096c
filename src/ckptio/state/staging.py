"""Staging: a private host copy of training state, so that it can be written while training goes on.

An asynchronous save must hold the state as it was when ``save_checkpoint()``
was called, while the trainer keeps changing its tensors. :class:`StateStager`
copies every tensor of a nested state (dicts, lists, tuples, tensors, other
leaves) into host buffers it owns:

* CUDA tensors go to page-locked (pinned) host buffers, copied with
  ``non_blocking=True`` and synchronised once at the end, so that the copy
  runs at the interconnect's speed without a bounce buffer;
* CPU tensors go to plain host buffers.

Buffers are kept between saves and reused when the tensor at the same place
of the state has the same shape and dtype, so the second and later saves
allocate nothing (no page faults, no pinning, which is slow) and the stager
holds at most one copy of the state at any time. Non-tensor leaves are deep
copied. Tensors that view the same memory (tied weights) are copied once and
stay shared in the copy, so tie detection still works on the staged state.

Host memory. Staging needs, on top of the training process's own use, one
copy of every staged tensor (their ``nbytes``), held until :meth:`release`.
Before allocating, the stager compares what it must newly allocate with the
memory the host (or the process's cgroup) still has available and refuses
with :class:`~ckptio.errors.InsufficientMemoryError` rather than let the
machine swap or the OOM killer end the job.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from ckptio.errors import InsufficientMemoryError

__all__ = ["StateStager", "available_host_memory", "state_nbytes"]

logger = logging.getLogger(__name__)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), or None without a limit."""
    v2 = Path("/sys/fs/cgroup")
    limit, used = _read_int(v2 / "memory.max"), _read_int(v2 / "memory.current")
    if limit is None:
        v1 = v2 / "memory"
        limit, used = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
    if limit is None or used is None or limit >= 2**60:  # v1 reports "no limit" as a huge number
        return None
    return max(limit - used, 0)


def available_host_memory() -> int | None:
    """Bytes of host memory this process can still allocate without swapping, or None if unknown.

    The smaller of the kernel's ``MemAvailable`` and what is left under the
    cgroup's memory limit (containers).
    """
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not found and hasattr(os, "sysconf"):
        try:
            found = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError):
            return None
    return min(found) if found else None


#: Where a tensor sits in a nested state: the keys and indices leading to it (never joined into a
#: string, so that the key ``"a/b"`` and the nesting ``"a" -> "b"``, or ``0`` and ``"0"``, stay apart).
_Path = tuple[Any, ...]


def _tensors(value: Any, path: _Path) -> Iterator[tuple[_Path, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, (*path, key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, (*path, i))


def _is_plain(tensor: torch.Tensor) -> bool:
    """A dense tensor on CPU or CUDA that a preallocated buffer can receive."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout is torch.strided
        and tensor.device.type in ("cpu", "cuda")
        and not tensor.is_quantized
    )


def _memory_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Tensors with equal keys view exactly the same memory (tied weights); empty tensors never do."""
    if tensor.numel() == 0:
        return ("empty", id(tensor))
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def state_nbytes(state: Any) -> int:
    """Bytes of tensor data in a nested state, each distinct tensor counted once."""
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for _, tensor in _tensors(state, ()):
        key = _memory_key(tensor) if _is_plain(tensor) else (id(tensor),)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class _Buffer:
    tensor: torch.Tensor

    def fits(self, source: torch.Tensor) -> bool:
        return (
            self.tensor.shape == source.shape
            and self.tensor.dtype == source.dtype
            and self.tensor.is_pinned() == source.is_cuda
        )


class StateStager:
    """Copies nested state into host buffers that it keeps and reuses from one save to the next.

    Not thread-safe: stage one state at a time, and only once the previous
    staged copy is no longer read (the manager stages the next save only after
    the pending one has finished).

    Args:
        available_memory: how many bytes of host memory are still available
            (default :func:`available_host_memory`); None from it skips the check.
        reserve: bytes to leave free besides the staging buffers (the upload
            pipeline's part buffers, the training step's own growth).
    """

    def __init__(
        self,
        *,
        available_memory: Callable[[], int | None] = available_host_memory,
        reserve: int = 0,
    ) -> None:
        self._available_memory = available_memory
        self._reserve = reserve
        self._buffers: dict[_Path, _Buffer] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of host memory the stager's buffers hold."""
        return sum(b.tensor.numel() * b.tensor.element_size() for b in self._buffers.values())

    def release(self) -> None:
        """Drop every buffer; the next :meth:`stage` allocates again."""
        self._buffers.clear()

    def stage(self, state: Mapping[str, Any], *, what: str = "state") -> dict[str, Any]:
        """A copy of ``state`` whose tensors live in this stager's host buffers.

        Args:
            state: named parts of the state (``{"model": state_dict, "optimizer": ...}``).
            what: named in the error message (the checkpoint being saved).

        Raises:
            InsufficientMemoryError: the buffers to allocate do not fit in the
                available host memory; nothing was copied.
        """
        plan = self._plan(state)
        self._check_memory(plan, what)
        copied: dict[tuple[Any, ...], torch.Tensor] = {}
        cuda_used = False

        def copy_tensor(path: _Path, tensor: torch.Tensor) -> torch.Tensor:
            nonlocal cuda_used
            if not _is_plain(tensor):
                return tensor.detach().clone()
            key = _memory_key(tensor)
            if key in copied:
                return copied[key]
            buffer = self._buffers[path].tensor
            buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
            cuda_used = cuda_used or tensor.is_cuda
            copied[key] = buffer
            return buffer

        staged = {name: self._copy(value, (name,), copy_tensor) for name, value in state.items()}
        if cuda_used:
            torch.cuda.synchronize()  # non_blocking device-to-host copies must land before anyone reads
        return staged

    def _plan(self, state: Mapping[str, Any]) -> dict[_Path, torch.Tensor]:
        """The tensor each buffer path receives (first of tied tensors only); drop buffers that no longer fit."""
        wanted: dict[_Path, torch.Tensor] = {}
        seen: set[tuple[Any, ...]] = set()
        for name, value in state.items():
            for path, tensor in _tensors(value, (name,)):
                if not _is_plain(tensor):
                    continue
                key = _memory_key(tensor)
                if key not in seen:
                    seen.add(key)
                    wanted[path] = tensor
        for path in list(self._buffers):  # free what will not be reused before allocating anything
            if path not in wanted or not self._buffers[path].fits(wanted[path]):
                del self._buffers[path]
        return wanted

    def _check_memory(self, wanted: Mapping[_Path, torch.Tensor], what: str) -> None:
        missing = {p: t for p, t in wanted.items() if p not in self._buffers}
        needed = sum(t.numel() * t.element_size() for t in missing.values())
        available = self._available_memory() if needed else None
        if available is not None and needed + self._reserve > available:
            self._buffers.clear()
            raise InsufficientMemoryError(
                f"cannot stage {what} for an asynchronous save: it needs {needed / 2**20:.0f} MiB of host memory "
                f"for a copy of the state (+ {self._reserve / 2**20:.0f} MiB reserve) and only "
                f"{available / 2**20:.0f} MiB is available; nothing was written and earlier checkpoints are intact; "
                "free memory or save synchronously (async_save=False)"
            )
        for path, tensor in missing.items():
            pin = tensor.is_cuda
            self._buffers[path] = _Buffer(torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin))
        logger.debug("allocated %d staging buffers (%d bytes)", len(missing), needed)

    def _copy(self, value: Any, path: _Path, copy_tensor: Callable[[_Path, torch.Tensor], torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            return copy_tensor(path, value)
        if isinstance(value, Mapping):
            items = [(k, self._copy(v, (*path, k), copy_tensor)) for k, v in value.items()]
            try:
                return cast(Any, type(value))(items)  # dict, OrderedDict, and other mappings built from pairs
            except TypeError:
                return dict(items)
        if isinstance(value, list):
            return [self._copy(v, (*path, i), copy_tensor) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            items_t = [self._copy(v, (*path, i), copy_tensor) for i, v in enumerate(value)]
            return type(value)(*items_t) if hasattr(value, "_fields") else type(value)(items_t)
        return copy.deepcopy(value)
