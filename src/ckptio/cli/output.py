"""What the commands print: sizes for humans, JSON documents for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["format_size", "print_json"]


def format_size(size: int | None) -> str:
    """Format a byte count for humans (``"1.5 MiB"``); ``"-"`` when unknown."""
    if size is None:
        return "-"
    if size < 1024:
        return f"{size} B"
    value, unit = float(size), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def print_json(document: dict[str, Any]) -> None:
    """Print ``document`` as the one JSON document of a ``--json`` command (strict JSON, no NaN)."""
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
