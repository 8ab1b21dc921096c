"""Who is writing a checkpoint directory: the in-progress marker as a claim with a token.

A save *claims* its directory by creating ``checkpoint_in_progress.json`` only
if it is absent (an exclusive create: an atomic link locally, a conditional
write on object stores). The marker holds a random token, the writer's host,
process and a heartbeat time that the writer refreshes every
:data:`HEARTBEAT_INTERVAL_S` while it writes. A second saver that finds a
marker decides whether its writer is alive:

- a marker of this very process is alive while its claim is held;
- a marker of another process on this host (same PID namespace) is dead once
  that process is gone;
- otherwise a marker is alive until its heartbeat is older than
  :data:`STALE_AFTER_S` (hosts' clocks are assumed to agree within that much).

A live claim is never touched: the second saver is refused before it writes or
deletes anything. A dead one (a crashed save) is taken over. Before committing,
the writer checks that the marker still holds its token, so a save whose claim
was taken over (it stalled past :data:`STALE_AFTER_S`) is refused instead of
committed.

No maintained library offers a lease over arbitrary fsspec storage; this is
the smallest one that fails closed on every backend.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from ckptio.checkpoint.layout import IN_PROGRESS_NAME
from ckptio.checkpoint.manifest import utc_timestamp
from ckptio.errors import (
    ConcurrentSaveError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
)
from ckptio.storage import Storage

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "STALE_AFTER_S",
    "MarkerOwner",
    "SaveClaim",
    "claim_marker",
    "live_marker_owner",
    "marker_bytes",
    "refuse_if_claimed",
]

logger = logging.getLogger(__name__)

#: How often a writer refreshes the heartbeat of its marker.
HEARTBEAT_INTERVAL_S = 10.0
#: A marker whose heartbeat is older than this belongs to a dead or stalled save.
STALE_AFTER_S = 60.0

#: Tokens of the claims this process holds now.
_held_tokens: set[str] = set()
_held_lock = threading.Lock()


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux), so that PIDs are compared only within one."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def marker_bytes(
    *, checkpoint_id: int | str | None, world_size: int | None, action: str, token: str | None = None
) -> bytes:
    """The marker's JSON: what is being done, by whom, and when it last showed signs of life."""
    marker: dict[str, Any] = {
        "action": action,
        "checkpoint_id": checkpoint_id,
        "world_size": world_size,
        "started": utc_timestamp(),
        "heartbeat_unix": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
    }
    if token is not None:
        marker["token"] = token
    return (json.dumps(marker, indent=2) + "\n").encode()


@dataclass(frozen=True)
class MarkerOwner:
    """The writer a live marker belongs to, for messages."""

    host: str
    pid: int
    started: str
    heartbeat_age_s: float

    def describe(self) -> str:
        return (
            f"process {self.pid} on {self.host}, started {self.started}, "
            f"last heartbeat {self.heartbeat_age_s:.0f} s ago"
        )


def _read_marker(storage: Storage) -> dict[str, Any] | None:
    """The marker's fields; None when there is none (or it is not a marker this code wrote)."""
    try:
        data = json.loads(storage.read_bytes(IN_PROGRESS_NAME, 0))  # from offset 0: no size request first
    except ObjectNotFoundError:
        return None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_alive(marker: dict[str, Any], stale_after_s: float) -> bool:
    token, heartbeat, pid = marker.get("token"), marker.get("heartbeat_unix"), marker.get("pid")
    if not isinstance(token, str) or not isinstance(heartbeat, int | float) or not isinstance(pid, int):
        return False  # a marker without a claim (older versions, deletes): never a live writer
    same_pids = marker.get("host") == socket.gethostname() and marker.get("pid_namespace") == _pid_namespace()
    if same_pids and pid == os.getpid():
        with _held_lock:
            return token in _held_tokens
    if same_pids and not _process_alive(pid):
        return False
    return time.time() - heartbeat <= stale_after_s


def live_marker_owner(storage: Storage, *, stale_after_s: float = STALE_AFTER_S) -> MarkerOwner | None:
    """The writer of the directory's marker if it is alive, else None (no marker, or a dead save's)."""
    marker = _read_marker(storage)
    if marker is None or not _is_alive(marker, stale_after_s):
        return None
    heartbeat = float(marker["heartbeat_unix"])
    return MarkerOwner(
        host=str(marker.get("host")),
        pid=int(marker["pid"]),
        started=str(marker.get("started")),
        heartbeat_age_s=max(0.0, time.time() - heartbeat),
    )


def _refusal(storage: Storage, owner: MarkerOwner) -> ConcurrentSaveError:
    return ConcurrentSaveError(
        f"cannot save to {storage.url!r}: another save is writing it ({owner.describe()}); "
        "this save wrote and deleted nothing there; save under another name, or wait for that save to finish"
    )


@dataclass
class SaveClaim:
    """A held claim on a checkpoint directory: keeps its marker's heartbeat fresh until released.

    The heartbeat runs on a daemon thread from :meth:`keep_alive` until
    :meth:`release`, or until the claim is garbage collected.
    """

    storage: Storage
    token: str
    checkpoint_id: int | str | None
    world_size: int
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        with _held_lock:
            _held_tokens.add(self.token)
        weakref.finalize(self, _release_token, self.token, self._stop)

    def keep_alive(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> SaveClaim:
        """Refresh the marker's heartbeat every ``interval_s`` seconds until released; returns self."""
        thread = threading.Thread(
            target=_heartbeat,
            args=(weakref.ref(self), self._stop, interval_s),
            name="ckptio-claim-heartbeat",
            daemon=True,
        )
        thread.start()
        return self

    def still_held(self) -> bool:
        """Whether the marker still holds this claim's token (one read)."""
        marker = _read_marker(self.storage)
        return marker is not None and marker.get("token") == self.token

    def verify(self) -> None:
        """Raise :class:`ConcurrentSaveError` unless the marker still holds this claim's token."""
        if not self.still_held():
            raise ConcurrentSaveError(
                f"cannot commit {self.storage.url!r}: another saver took this checkpoint over while this save "
                "was writing (this save stalled, or its in-progress marker was replaced); "
                "this save is not committed"
            )

    def refresh(self) -> None:
        """Rewrite the marker with a new heartbeat, if it still holds this claim's token."""
        if not self.still_held():
            return
        self.storage.write_bytes(
            IN_PROGRESS_NAME,
            marker_bytes(checkpoint_id=self.checkpoint_id, world_size=self.world_size, action="save", token=self.token),
        )

    def release(self) -> None:
        """Stop the heartbeat; the marker stays (the commit or the next save removes it)."""
        _release_token(self.token, self._stop)


def _release_token(token: str, stop: threading.Event) -> None:
    stop.set()
    with _held_lock:
        _held_tokens.discard(token)


def _heartbeat(claim_ref: weakref.ref[SaveClaim], stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        claim = claim_ref()
        if claim is None:
            return
        try:
            claim.refresh()
        except StorageError as exc:  # the save itself will meet the same fault and report it
            logger.debug("could not refresh the heartbeat of %s: %s", claim.storage.url_of(IN_PROGRESS_NAME), exc)
        del claim


def claim_marker(
    storage: Storage,
    *,
    checkpoint_id: int | str | None,
    world_size: int,
    stale_after_s: float = STALE_AFTER_S,
) -> SaveClaim:
    """Create the directory's marker for this save; take over a dead save's marker; refuse a live one.

    Raises:
        ConcurrentSaveError: a live save holds the directory; nothing was written.
        StorageError: the marker could not be written.
    """
    token = secrets.token_hex(16)
    data = marker_bytes(checkpoint_id=checkpoint_id, world_size=world_size, action="save", token=token)
    try:
        storage.create_exclusive(IN_PROGRESS_NAME, data)
    except ObjectExistsError:
        owner = live_marker_owner(storage, stale_after_s=stale_after_s)
        if owner is not None:
            raise _refusal(storage, owner) from None
        logger.warning("taking over %s, left by a save that is no longer running", storage.url_of(IN_PROGRESS_NAME))
        storage.write_bytes(IN_PROGRESS_NAME, data)
    return SaveClaim(storage, token, checkpoint_id, world_size)


def refuse_if_claimed(storage: Storage, *, stale_after_s: float = STALE_AFTER_S) -> None:
    """Raise :class:`ConcurrentSaveError` if a live save holds the directory (one read of its marker)."""
    owner = live_marker_owner(storage, stale_after_s=stale_after_s)
    if owner is not None:
        raise _refusal(storage, owner)
