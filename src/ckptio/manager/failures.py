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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ckptio.errors import CheckpointError, CkptioError
from ckptio.state import World

__all__ = ["RankFailure", "error_for", "on_every_rank", "on_rank0"]

T = TypeVar("T")


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


def _exchange(
    collective: Callable[[Any], T], outcome: Any, failure: RankFailure | None, *, action: str, safe: str
) -> T:
    """Exchange this rank's outcome; a rank that died or stopped answering fails it with a ckptio error
    (this rank's own failure when it has one), never a raw transport error."""
    try:
        return collective(outcome)
    except Exception as exc:  # noqa: BLE001 - the process group's own error (gloo, NCCL, timeout)
        if failure is not None:
            raise error_for([failure], action=action, safe=safe) from exc
        raise CheckpointError(
            f"{action}: the ranks could not exchange their outcome (a rank died or stopped answering): "
            f"{type(exc).__name__}: {exc}; {safe}"
        ) from exc


def on_rank0(world: World, fn: Callable[[], T], *, action: str, safe: str) -> T:
    """Run ``fn`` on rank 0 and share its result; if it raised, every rank raises the same error class."""
    if world.world_size == 1:
        return fn()
    outcome: tuple[Any, RankFailure | None] = (None, None)
    if world.rank == 0:
        try:
            outcome = (fn(), None)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            outcome = (None, RankFailure.capture(0, exc))
    result, failure = _exchange(world.broadcast_object, outcome, outcome[1], action=action, safe=safe)
    if failure is not None:
        raise error_for([failure], action=action, safe=safe)
    return result  # type: ignore[no-any-return]


def on_every_rank(world: World, fn: Callable[[], T], *, action: str, safe: str, share: bool = True) -> list[T]:
    """Run ``fn`` on every rank; if any rank raised, every rank raises.

    Returns:
        Every rank's result, indexed by rank (``share=True``: results must
        pickle); with ``share=False`` only success is exchanged and the list
        holds this rank's result alone.
    """
    if world.world_size == 1:
        return [fn()]
    result: Any = None
    failure: RankFailure | None = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised
        failure = RankFailure.capture(world.rank, exc)
    gathered = _exchange(world.all_gather_object, (result if share else None, failure), failure, action=action, safe=safe)
    failures = [f for _, f in gathered if f is not None]
    if failures:
        raise error_for(failures, action=action, safe=safe)
    return [r for r, _ in gathered] if share else [result]
