"""How far training has got: a small :class:`Stateful` for trainers to checkpoint."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ckptio.errors import InvalidArgumentError

__all__ = ["TrainingProgress"]

_COUNTERS = ("step", "epoch", "tokens_seen", "samples_seen")


@dataclass
class TrainingProgress:
    """Step, epoch and data counters, plus free-form ``extra`` values.

    Usually registered as a ``GLOBAL`` component (every rank agrees on it).
    ``extra`` must hold only what ``torch.load(weights_only=True)`` accepts:
    numbers, strings, bytes, ``None``, tensors, and dicts/lists/tuples of them.
    """

    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Return the counters and a deep copy of ``extra`` (later changes do not leak in)."""
        state: dict[str, Any] = {name: int(getattr(self, name)) for name in _COUNTERS}
        state["extra"] = copy.deepcopy(self.extra)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output; counters missing from it keep their values.

        Raises:
            InvalidArgumentError: not a dict, a counter that is not an integer,
                or ``extra`` that is not a dict.
        """
        if not isinstance(state_dict, dict):
            raise InvalidArgumentError(f"TrainingProgress state must be a dict, got {type(state_dict).__name__}")
        counters: dict[str, int] = {}
        for name in _COUNTERS:
            if name in state_dict:
                value = state_dict[name]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise InvalidArgumentError(f"TrainingProgress.{name} must be an int, got {value!r}")
                counters[name] = value
        extra = state_dict.get("extra", self.extra)
        if not isinstance(extra, dict):
            raise InvalidArgumentError(f"TrainingProgress.extra must be a dict, got {type(extra).__name__}")
        for name, value in counters.items():
            setattr(self, name, value)
        self.extra = copy.deepcopy(extra)
