"""Check that a REPLICATED component really is identical on every rank before rank 0 saves it.

Only rank 0's copy of a replicated component is written, so a rank whose copy
drifted (a missed all-reduce, a non-deterministic kernel) would silently lose
its state on resume. :func:`check_replicated` digests every leaf of the state
dict on each rank, gathers the digests (never the tensors) and raises
:class:`ReplicationMismatchError` on *every* rank when they differ, naming the
component, each differing path (``optimizer.state.0.exp_avg``) and the ranks
whose copy differs from rank 0's.

Tensors are compared by their bit patterns, so bf16 and other dtypes without a
NumPy equivalent work, a NaN equals the same NaN, and ``-0.0`` differs from
``0.0``. Levels (:class:`~ckptio.state.components.ValidationLevel`):

* ``quick``: dtype, shape and a strided sample of at most 4096 elements per tensor;
* ``tensor``: CRC32C of every element;
* ``full``: 128-bit BLAKE2b of every element.

Non-tensor leaves (learning rates, step counters, strings) are compared by
value at every level.

**Collective:** every rank must call it for the same component in the same
order. It costs one small ``all_gather_object`` when the copies agree and a
second one, with the per-leaf digests, when they do not.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator
from typing import Any

import torch

from ckptio.errors import (
    InvalidArgumentError,
    ReplicationMismatchError,
)
from ckptio.state.components import ValidationLevel
from ckptio.state.distributed import World
from ckptio.storage.integrity import Crc32c

__all__ = ["ReplicationMismatchError", "check_replicated", "state_digests"]

_QUICK_SAMPLE = 4096
_MAX_REPORTED = 5
_PRIMITIVES = (int, float, bool, complex, str, bytes, bytearray, type(None), torch.dtype, torch.device)




def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor``'s elements, in row-major order, on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    array: Any = flat.view(torch.uint8).numpy()  # zero-copy view of the tensor's bytes
    return memoryview(array)


def _tensor_digest(tensor: torch.Tensor, level: ValidationLevel) -> str:
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    elif tensor.layout is not torch.strided:
        tensor = tensor.to_dense()
    head = f"tensor {tensor.dtype} {tuple(tensor.shape)}"
    if tensor.device.type == "meta":
        return f"{head} meta"
    if level is ValidationLevel.QUICK:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _QUICK_SAMPLE)
        crc = Crc32c()
        crc.update(_tensor_bytes(flat[::step]))
        return f"{head} sample/{step} crc32c {crc.hexdigest()}"
    data = _tensor_bytes(tensor)
    if level is ValidationLevel.FULL:
        return f"{head} blake2b {hashlib.blake2b(data, digest_size=16).hexdigest()}"
    crc = Crc32c()
    crc.update(data)
    return f"{head} crc32c {crc.hexdigest()}"


def _leaf_digest(value: Any) -> str:
    kind = type(value)
    if kind in _PRIMITIVES:
        return f"{kind.__name__} {value!r}"
    try:
        data = pickle.dumps(value, protocol=4)
    except Exception:  # noqa: BLE001 - unpicklable: fall back to its repr
        return f"{kind.__qualname__} {value!r}"
    return f"{kind.__qualname__} blake2b {hashlib.blake2b(data, digest_size=16).hexdigest()}"


def _walk(value: Any, path: str, level: ValidationLevel) -> Iterator[tuple[str, str]]:
    if isinstance(value, torch.Tensor):
        yield path, _tensor_digest(value, level)
    elif isinstance(value, dict):
        yield path, f"{type(value).__name__} len {len(value)}"
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}", level)
    elif isinstance(value, (list, tuple)):
        yield path, f"{type(value).__name__} len {len(value)}"
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}.{index}", level)
    else:
        yield path, _leaf_digest(value)


def state_digests(state_dict: Any, *, key: str, level: ValidationLevel | str = "tensor") -> dict[str, str]:
    """Digest every leaf (and container shape) of ``state_dict``, by dotted path starting at ``key``."""
    level = ValidationLevel(level)
    digests: dict[str, str] = {}
    for path, digest in _walk(state_dict, key, level):
        # Two keys with the same text (0 and "0") would collide: keep both.
        digests[path] = f"{digests[path]} | {digest}" if path in digests else digest
    return digests


def _summary(digests: dict[str, str]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for path in sorted(digests):
        hasher.update(f"{path}\0{digests[path]}\0".encode())
    return hasher.hexdigest()


def _mismatches(per_rank: list[dict[str, str]]) -> list[tuple[str, list[int]]]:
    """``(path, ranks differing from rank 0)`` for each path, in rank 0's order, then others'."""
    paths = list(dict.fromkeys(path for digests in per_rank for path in digests))
    found = []
    for path in paths:
        reference = per_rank[0].get(path)
        differing = [r for r, digests in enumerate(per_rank) if digests.get(path) != reference]
        if differing:
            found.append((path, differing))
    return found


def check_replicated(
    state_dict: Any, world: World, *, key: str, level: ValidationLevel | str = ValidationLevel.TENSOR
) -> None:
    """Raise on every rank if this rank's ``state_dict`` differs from another rank's.

    Collective (see the module docstring); a no-op in a world of one or with
    level ``"none"``.

    Raises:
        ReplicationMismatchError: the copies differ; names the component, the
            paths and the ranks; nothing has been written by this check.
        InvalidArgumentError: an unknown level.
    """
    try:
        level = ValidationLevel(level)
    except ValueError:
        raise InvalidArgumentError(
            f"validation level must be one of {[v.value for v in ValidationLevel]}, got {level!r}"
        ) from None
    if level is ValidationLevel.NONE or world.world_size == 1:
        return
    digests = state_digests(state_dict, key=key, level=level)
    summaries = world.all_gather_object(_summary(digests))
    if len(set(summaries)) == 1:
        return
    mismatches = _mismatches(world.all_gather_object(digests))
    if not mismatches:  # pragma: no cover - equal digests give equal summaries
        return
    shown = "; ".join(f"{path!r} differs on ranks {ranks}" for path, ranks in mismatches[:_MAX_REPORTED])
    more = f"; and {len(mismatches) - _MAX_REPORTED} more" if len(mismatches) > _MAX_REPORTED else ""
    raise ReplicationMismatchError(
        f"replicated component {key!r} is not identical on all {world.world_size} ranks "
        f"(level {level.value!r}, compared with rank 0, whose copy would be saved): {shown}{more}; "
        "make the copies identical, or register the component as PER_RANK",
        key=key,
        mismatches=mismatches,
    )
