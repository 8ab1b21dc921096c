"""Credentials never reach the terminal: finding them in a command line and its options, and hiding them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

__all__ = ["REDACTED", "RedactingFormatter", "credential_values", "redact", "secret_values"]

#: Options whose values may hold credentials: never echoed in an error message.
SECRET_OPTIONS = ("--storage-options", "--dst-storage-options")
REDACTED = "<redacted>"
#: Option names (case-insensitive substrings) whose values are credentials, like ``aws_secret_access_key``.
_CREDENTIAL_WORDS = ("secret", "token", "password", "credential", "private", "access_key")


def secret_values(args: Sequence[str]) -> list[str]:
    """The values given to :data:`SECRET_OPTIONS` in ``args`` (also ``--opt=value`` and abbreviations).

    Over-redacting is harmless; an echoed credential is not.
    """
    values: list[str] = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if len(flag) < 3 or not flag.startswith("--") or not any(o.startswith(flag) for o in SECRET_OPTIONS):
            continue
        if eq:
            values.append(value)
        elif i + 1 < len(args):
            values.append(args[i + 1])
    # A JSON object anywhere (say, after an empty ``--storage-options=``) is options, never a URL.
    return values + [arg for arg in args if arg.lstrip().startswith("{")]


def credential_values(options: object, secret: bool = False) -> list[str]:
    """The strings under credential-like keys of parsed options (``secret``, ``token``, ...), at any depth."""
    if isinstance(options, dict):
        named = {k: secret or k == "key" or any(w in str(k).lower() for w in _CREDENTIAL_WORDS) for k in options}
        return [v for k, item in options.items() for v in credential_values(item, named[k])]
    if isinstance(options, list):
        return [v for item in options for v in credential_values(item, secret)]
    return [options] if secret and isinstance(options, str) and len(options) >= 8 else []


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in ``text``, longest first so a value that holds another goes whole."""
    for value in sorted({v for v in secrets if v}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    """A log formatter that redacts credentials (a backstop: ckptio never logs them itself)."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets  # filled in once the options are parsed

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)
