"""Figures of the reliability suite: what each check tried, recorded after its assertions passed.

A test calls :func:`record` once its checks have passed, e.g.
``record("sigkill during save", backend="gcs", crashes=10, data_lost=0)``. Nothing is
recorded unless ``CKPTIO_RELIABILITY_FIGURES`` names a file; ``scripts/reliability_report.py``
sets it, runs the suite and renders the lines into ``docs/reliability.md``. Lines are
appended under a lock, so tests in several processes may record at once.
"""

from __future__ import annotations

import fcntl
import json
import os

ENV_VAR = "CKPTIO_RELIABILITY_FIGURES"


def record(check: str, **figures: int | str) -> None:
    """Append one JSON line ``{"check": check, **figures}`` to the figures file, if one is set."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    line = json.dumps({"check": check, **figures}, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
