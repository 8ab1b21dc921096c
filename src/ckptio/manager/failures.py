"""Failures across ranks: every rank raises the same ckptio error as the rank that failed.

A rank that fails during a save or a load captures its exception as a
:class:`RankFailure` (class, message, and the pickled exception itself);
the ranks exchange their failures in a collective they all reach, and each
raises a copy of the first failing rank's error: the same ckptio class,
its attributes (a replication mismatch keeps its list of mismatches), and a
message naming the failing rank. An error that is not a ckptio error (a bug,
a user's ``state_dict`` raising) becomes a :class:`~ckptio.errors.CheckpointError`
naming its type.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass

from ckptio.errors import CheckpointError, CkptioError

__all__ = ["RankFailure", "error_for"]


@dataclass(frozen=True)
class RankFailure:
    """One rank's exception, in a form that crosses process boundaries."""

    rank: int
    type_name: str
    message: str
    pickled: bytes | None = None

    @classmethod
    def capture(cls, rank: int, exc: BaseException) -> RankFailure:
        """Record ``exc`` raised on ``rank`` (its pickle only when it is a ckptio error)."""
        pickled: bytes | None = None
        if isinstance(exc, CkptioError):
            try:
                pickled = pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an unpicklable attribute: keep class name and message
                pickled = None
        return cls(rank=rank, type_name=type(exc).__name__, message=str(exc), pickled=pickled)

    def original(self) -> CkptioError | None:
        """The ckptio exception as raised on its rank, or None when it was not one."""
        if self.pickled is None:
            return None
        try:
            exc = pickle.loads(self.pickled)  # noqa: S301 - pickled by a rank of this job
        except Exception:  # noqa: BLE001 - a class this rank cannot rebuild
            return None
        return exc if isinstance(exc, CkptioError) else None


def error_for(failures: Sequence[RankFailure], *, action: str, safe: str) -> CkptioError:
    """The error every rank raises for ``failures`` (at least one).

    Args:
        failures: what failed, on which ranks.
        action: what was attempted (``"cannot save 's3://b/run/checkpoints/checkpoint-7'"``).
        safe: what is still safe (``"earlier checkpoints are intact"``).
    """
    ordered = sorted(failures, key=lambda f: f.rank)
    first = ordered[0]
    others = [f"rank {f.rank}: {f.type_name}: {f.message}" for f in ordered[1:]]
    tail = f" (also {'; '.join(others)})" if others else ""
    original = first.original()
    if original is not None:
        detail = f"{action}: rank {first.rank} failed: {first.message}{tail}; {safe}"
        return original.with_message(detail)
    detail = f"{action}: rank {first.rank} failed: {first.type_name}: {first.message}{tail}; {safe}"
    return CheckpointError(detail)
