"""Best-checkpoint tracking: which checkpoints rotation must preserve.

Pure logic, no I/O: the manager persists the list in every manifest, so it
survives a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ckptio.errors import InvalidArgumentError

__all__ = ["BestEntry", "infer_greater_is_better", "rank_best"]

_LOWER_IS_BETTER_HINTS = ("loss", "error", "perplexity", "ppl", "wer", "cer")


@dataclass(frozen=True)
class BestEntry:
    """One tracked checkpoint: its directory name and the metric that ranked it."""

    name: str
    metric_key: str
    value: float
    greater_is_better: bool

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "metric_key": self.metric_key,
            "value": self.value,
            "greater_is_better": self.greater_is_better,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> BestEntry:
        return cls(
            name=str(data["name"]),
            metric_key=str(data["metric_key"]),
            value=float(str(data["value"])),
            greater_is_better=bool(data["greater_is_better"]),
        )


def infer_greater_is_better(metric_key: str) -> bool:
    """Whether a bigger value is better: losses, errors and perplexities are not."""
    return not any(hint in metric_key.lower() for hint in _LOWER_IS_BETTER_HINTS)


def rank_best(entries: list[BestEntry], candidate: BestEntry, keep: int) -> tuple[list[BestEntry], bool]:
    """Insert ``candidate`` and keep the ``keep`` best entries of its metric.

    A value of 0 is a value like any other. Ties keep the older entry first.
    An entry for the same checkpoint name is replaced.

    Returns:
        The new list, best first, and whether ``candidate`` made it into it.

    Raises:
        InvalidArgumentError: the value is NaN or infinite.
    """
    if not math.isfinite(candidate.value):
        raise InvalidArgumentError(
            f"metric {candidate.metric_key!r} of {candidate.name!r} is {candidate.value}; "
            "best-checkpoint tracking needs a finite number"
        )
    others = [e for e in entries if e.name != candidate.name and e.metric_key == candidate.metric_key]
    sign = -1.0 if candidate.greater_is_better else 1.0
    ranked = sorted([*others, candidate], key=lambda e: sign * e.value)  # stable: older first on ties
    kept = ranked[: max(keep, 0)]
    return kept, candidate in kept
