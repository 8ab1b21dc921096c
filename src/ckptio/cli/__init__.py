"""The ``ckptio`` command line: ``ls``, ``inspect``, ``verify``, ``latest``, ``cp``, ``prune``, ``export``.

Every command takes local paths or fsspec URLs; ``--storage-options JSON``
applies to all of them, given before or after the command name. Credentials in
it are never printed: usage errors, error lines, ``--debug`` tracebacks and log
lines redact them. ``ls``, ``inspect``, ``verify`` and ``latest`` take
``--json`` (one JSON document on stdout, for scripts); ``cp`` and ``export``
show a progress bar on a terminal.

Exit codes: 0 on success; 1 on a failure, with one line ``ckptio: error:
<message>`` on stderr (a traceback only with ``--debug``); 2 on a usage error
(a command line argparse rejects, or malformed ``--storage-options``), also as
one line. The command line installs a logging handler for the ``ckptio``
logger while it runs; the library itself never configures logging.

Modules: :mod:`~ckptio.cli.parser` (commands and options),
:mod:`~ckptio.cli.commands` (``ls``, ``inspect``, ``verify``, ``latest``,
``prune``), :mod:`~ckptio.cli.copy` (``cp``, ``export``, progress bars),
:mod:`~ckptio.cli.redact` (credentials), :mod:`~ckptio.cli.output`.
"""

from __future__ import annotations

import logging
import sys
import traceback

# `_copy_object` stays importable from here for code written against the single-module CLI.
from ckptio.checkpoint.copy import copy_object as _copy_object  # noqa: F401
from ckptio.checkpoint.copy import copy_order
from ckptio.cli.output import format_size
from ckptio.cli.parser import (
    EXIT_FAILURE,
    EXIT_USAGE,
    UsageError,
    build_parser,
    parse_size,
    parse_storage_options,
)
from ckptio.cli.redact import (
    RedactingFormatter,
    credential_values,
    redact,
    secret_values,
)
from ckptio.errors import CkptioError

__all__ = ["build_parser", "copy_order", "format_size", "main", "parse_size"]


def _error_line(exc: BaseException) -> str:
    """One line describing ``exc``: the message of ckptio errors, type and message otherwise."""
    text = str(exc) if isinstance(exc, (CkptioError, UsageError)) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``ckptio`` (also ``python -m ckptio``) and return the exit code (0, 1 or 2).

    Args:
        argv: the arguments without the program name; ``sys.argv[1:]`` when None.
    """
    raw_args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw_args
    # Nothing printed below may show a credential, even one a backend puts in its error message.
    secrets = secret_values(raw_args)
    package_logger = logging.getLogger("ckptio")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("ckptio: %(levelname)s: %(message)s", secrets))
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        args = build_parser().parse_args(raw_args)
        options = parse_storage_options(args.storage_options) or {}
        secrets += credential_values(options)
        dst_raw = getattr(args, "dst_storage_options", None)
        args.dst_options = parse_storage_options(dst_raw, "--dst-storage-options")
        secrets += credential_values(args.dst_options)
        return int(args.func(args, options))
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("ckptio: error: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the command line reports every failure as one line
        if debug:
            print(redact(traceback.format_exc(), secrets), end="", file=sys.stderr)
        print(f"ckptio: error: {redact(_error_line(exc), secrets)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
