"""Every random number generator of this process, as one :class:`Stateful`.

:class:`RNGState` captures Python's ``random``, NumPy's global generator, the
torch CPU generator and the generator of every CUDA device this process sees.
Each rank's generators differ, so register it as a ``PER_RANK`` component.

The state dict holds only tensors, ints, floats, strings and ``None``, so it
round-trips through ``torch.save`` and ``torch.load(weights_only=True)``
without allow-listing anything: Python's 625-word Mersenne Twister state and
NumPy's 624 keys are stored as int64 tensors, not as tuples or NumPy arrays.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

from ckptio.errors import InvalidArgumentError, RNGStateWarning

__all__ = ["RNGState", "RNGStateWarning"]

_FORMAT = 1




def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _set_python_state(state: dict[str, Any]) -> None:
    internal = tuple(int(x) for x in _tensor(state, "state", "python").tolist())
    random.setstate((int(state["version"]), internal, state["gauss_next"]))


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = _tensor(state, "keys", "numpy").numpy().astype(np.uint32)
    np.random.set_state(
        (str(state["bit_generator"]), keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))
    )


def _tensor(state: dict[str, Any], name: str, section: str) -> torch.Tensor:
    value = state.get(name)
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(f"RNG state [{section!r}][{name!r}] must be a tensor, got {type(value).__name__}")
    return value


def _cuda_states() -> list[torch.Tensor]:
    if not torch.cuda.is_available():
        return []
    return [s.cpu() for s in torch.cuda.get_rng_state_all()]


def _set_cuda_states(states: list[torch.Tensor]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(states) != available:
        warnings.warn(
            f"RNG state holds {len(states)} CUDA generator(s) but this process sees {available} CUDA device(s); "
            f"restoring the first {min(len(states), available)}, the others keep their current state",
            RNGStateWarning,
            stacklevel=3,
        )
    for device, state in enumerate(states[:available]):
        torch.cuda.set_rng_state(state.cpu(), device)


class RNGState:
    """The generators of this process: Python ``random``, NumPy, torch CPU and every CUDA device.

    ``state_dict()`` takes a snapshot at call time; ``load_state_dict()`` puts
    every generator back, so the numbers drawn afterwards are the ones that
    followed the snapshot. Generators the caller created themselves
    (``torch.Generator()``, ``np.random.default_rng()``) are not global and are
    not covered: checkpoint their owners instead.

    Args:
        include_cuda: capture and restore CUDA generators (when CUDA is available).
    """

    def __init__(self, *, include_cuda: bool = True) -> None:
        self.include_cuda = include_cuda

    def state_dict(self) -> dict[str, Any]:
        """Return a snapshot of every generator (tensors, ints, floats, strings only)."""
        return {
            "format": _FORMAT,
            "python": _python_state(),
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
            "cuda": _cuda_states() if self.include_cuda else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every generator from :meth:`state_dict` output.

        CUDA states saved for another number of devices are restored for the
        devices both have, with an :class:`RNGStateWarning`.

        Raises:
            InvalidArgumentError: the state is not what :meth:`state_dict` writes;
                no generator is changed then.
        """
        if not isinstance(state_dict, dict):
            raise InvalidArgumentError(f"RNG state must be a dict, got {type(state_dict).__name__}")
        missing = [name for name in ("python", "numpy", "torch") if name not in state_dict]
        if missing:
            raise InvalidArgumentError(f"RNG state lacks {missing}; it holds {sorted(state_dict)}")
        python, numpy_state = state_dict["python"], state_dict["numpy"]
        cuda = state_dict.get("cuda") or []
        if not isinstance(python, dict) or not isinstance(numpy_state, dict):
            raise InvalidArgumentError("RNG state 'python' and 'numpy' sections must be dicts")
        torch_state = _tensor(state_dict, "torch", "torch")
        if not isinstance(cuda, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in cuda):
            raise InvalidArgumentError("RNG state 'cuda' must be a list of tensors")
        before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            _set_python_state(python)
            _set_numpy_state(numpy_state)
            torch.set_rng_state(torch_state.cpu())
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            random.setstate(before[0])
            np.random.set_state(before[1])
            torch.set_rng_state(before[2])
            raise InvalidArgumentError(f"RNG state is malformed: {type(exc).__name__}: {exc}") from exc
        if self.include_cuda and (cuda or torch.cuda.is_available()):
            _set_cuda_states(list(cuda))
