"""The argument parser of ``ckptio``: commands, options, and usage errors that never echo credentials."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ckptio._version import __version__
from ckptio.cli.commands import cmd_inspect, cmd_latest, cmd_ls, cmd_prune, cmd_verify
from ckptio.cli.copy import cmd_convert, cmd_cp, cmd_export
from ckptio.cli.redact import redact, secret_values

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "parse_size", "parse_storage_options"]

#: Exit codes: success; a failure (one line on stderr); a command line that cannot be run.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
exit codes:
  0  success
  1  failure: one line 'ckptio: error: <message>' on stderr (a traceback only with --debug);
     also `verify` finding problems and `latest` finding no complete checkpoint
  2  usage error: an unknown command or option, a bad option value, malformed --storage-options

--json (ls, inspect, verify, latest) prints one JSON document on stdout, even when the
command then exits 1 (verify with problems, latest with none); sizes are in bytes, statuses
are strings; see `ckptio COMMAND --help` for the keys.
"""

#: What ``--json`` prints, per command (shown by ``ckptio COMMAND --help``).
_JSON_HELP = {
    "ls": '{"url", "checkpoints": [{"name", "checkpoint_id" (int|null), "url", "status" '
    '("complete"|"incomplete"|"not_a_checkpoint"), "complete" (bool), "size_bytes" (int|null), '
    '"timestamp" (str|null), "error" (str|null)}]}, oldest first',
    "inspect": '{"url", "status", "problems": [str], "manifest": null | {"checkpoint_id", "checkpoint_path", '
    '"timestamp", "world_size", "format_version", "library_version", "torch_version", "size_bytes", "file_count", '
    '"metadata", "components": [{"key", "sharing_pattern", "ranks", "size_bytes", "files"}], '
    '"files": [{"path", "size_bytes", "crc32c"}]}, "weights": null | {"files", "index_metadata", '
    '"tensors": [{"name", "dtype" (str|null), "shape" ([int]|null), "file"}]}}',
    "verify": '{"url", "ok" (bool), "problems": [str]}; exit code 1 when there are problems',
    "latest": '{"url", "latest" (str|null)}; exit code 1 when null',
}


class UsageError(Exception):
    """A command line that cannot be run (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports usage errors as exceptions (exit code 2, one line).

    Error messages never echo the value of ``--storage-options`` or
    ``--dst-storage-options``: it may hold credentials.
    """

    _parsed_args: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Remember the arguments, so that :meth:`error` can redact their secret values."""
        self._parsed_args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._parsed_args, namespace)

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing usage and exiting; redact secret option values."""
        # `from None`: the argparse error being handled (shown by --debug) holds the unredacted text.
        raise UsageError(redact(message, secret_values(self._parsed_args))) from None


def parse_storage_options(raw: str | None, flag: str = "--storage-options") -> dict[str, Any] | None:
    """Parse a JSON object of fsspec options (None when not given).

    Raises:
        UsageError: not JSON, or not an object; the message never holds the value.
    """
    if raw is None:
        return None
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise UsageError(f"{flag} must be a JSON object, got {type(options).__name__}")
    return options


#: Units ``--max-shard-size`` accepts, as Hugging Face reads them (``5GB`` is 5 * 10**9 bytes).
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """A positive byte count: ``1048576``, ``500MB``, ``2GiB`` (units as Hugging Face reads them)."""
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size such as 2147483648, 500MB or 2GiB, got {text!r}") from None
    if not 1 <= value < 2**63:  # also NaN
        raise argparse.ArgumentTypeError(f"the size must be at least one byte, got {text!r}")
    return int(value)


def _keep_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}; nothing was deleted") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}; nothing was deleted")
    return value


def _add_global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """Add the options every command accepts, before or after its name."""
    parser.add_argument("--version", action="version", version=f"ckptio {__version__}")
    parser.add_argument(
        "--storage-options", metavar="JSON", default=default, help="fsspec options (JSON object) for every URL"
    )
    debug_default = False if default is None else default
    parser.add_argument(
        "--debug", action="store_true", default=debug_default, help="debug logging and full tracebacks on errors"
    )


def _add_weights_output(p: argparse.ArgumentParser, *, overwrite_help: str) -> None:
    """The options of a command that writes model weight shards to DST (``export``, ``convert``)."""
    p.add_argument(
        "--max-shard-size", type=parse_size, default=2**31, metavar="SIZE", help="largest shard (default 2GiB)"
    )
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--dst-storage-options", metavar="JSON", help="fsspec options for DST (default: --storage-options)")
    _add_progress(p)


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr, or not (default: only when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``ckptio``."""
    parser = _Parser(
        prog="ckptio",
        description="Crash-safe PyTorch checkpoints on local disk, S3, GCS or any fsspec URL.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, default=None)
    # The same options after the subcommand; SUPPRESS keeps a value given before it.
    common = _Parser(add_help=False)
    _add_global_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    simple: list[tuple[str, str, Callable[[argparse.Namespace, dict[str, Any]], int], str]] = [
        ("ls", "url", cmd_ls, "list checkpoints under URL/checkpoints"),
        ("inspect", "path", cmd_inspect, "show tensors, metadata and components of a checkpoint or model dir"),
        ("verify", "path", cmd_verify, "check sizes and checksums of every file of a checkpoint"),
        ("latest", "url", cmd_latest, "print the newest complete checkpoint under URL"),
    ]
    for name, dest, func, help_text in simple:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.add_argument(dest, metavar=dest.upper())
        p.add_argument("--json", action="store_true", help=f"print one JSON document on stdout: {_JSON_HELP[name]}")
        p.set_defaults(func=func)
    cp_help = "copy a complete checkpoint to another storage, manifest last; a re-run resumes an interrupted copy"
    p = sub.add_parser("cp", help=cp_help, description=cp_help, parents=[common])
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what DST holds; a committed checkpoint there stays valid until a file it lists must change, "
        "then DST is incomplete until the new manifest is written",
    )
    p.add_argument("--dst-storage-options", metavar="JSON", help="fsspec options for DST (default: --storage-options)")
    _add_progress(p)
    p.set_defaults(func=cmd_cp)
    p = sub.add_parser("prune", help="delete all but the newest N complete checkpoints", parents=[common])
    p.add_argument("url", metavar="URL")
    p.add_argument("--keep", type=_keep_count, required=True, metavar="N", help="complete checkpoints to keep (>= 1)")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser(
        "export", help="write a checkpoint's model as a Hugging Face safetensors directory", parents=[common]
    )
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("dst", metavar="DST")
    _add_weights_output(p, overwrite_help="replace model weights already at DST")
    p.set_defaults(func=cmd_export)
    convert_help = "write the model weights of a checkpoint or model directory to DST as safetensors or .bin shards"
    p = sub.add_parser("convert", help=convert_help, description=convert_help, parents=[common])
    p.add_argument("path", metavar="PATH")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", required=True, choices=("safetensors", "bin"), help="the format to write")
    _add_weights_output(p, overwrite_help="write into a DST that already holds files")
    p.set_defaults(func=cmd_convert)
    return parser
