"""Strict JSON for untrusted checkpoint files: no duplicate keys, no NaN, no unbounded nesting.

``json.loads`` silently keeps the last of two equal keys (so one file could be
read two ways), accepts ``NaN``/``Infinity``, and raises ``RecursionError`` on
deeply nested input or a bare ``ValueError`` on an integer of more than 4300
digits. :func:`loads` turns every one of these into :class:`ValueError`
(:class:`~ckptio.errors.InvalidArgumentError` or ``json.JSONDecodeError``),
which each parser reports as a corrupt file naming its URL.
"""

from __future__ import annotations

import json
from typing import Any

from ckptio.errors import InvalidArgumentError

__all__ = ["loads"]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members as a dict; raise if a key appears twice."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidArgumentError(f"key {key!r} appears more than once in one JSON object")
        result[key] = value
    return result


def _reject_constant(name: str) -> float:
    raise InvalidArgumentError(f"non-finite number {name} is not valid JSON")


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse ``raw`` as strict JSON.

    Raises:
        ValueError: not UTF-8, malformed, a duplicate key, ``NaN``/``Infinity``,
            nesting too deep or an integer too long to convert.
    """
    text = bytes(raw) if isinstance(raw, bytearray | memoryview) else raw
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidArgumentError("JSON is nested too deeply") from None
