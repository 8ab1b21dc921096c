"""The ``ckptio`` command line: ``ls``, ``inspect``, ``verify``, ``latest``, ``cp``, ``prune``, ``export``.

Every command takes local paths or fsspec URLs; ``--storage-options JSON``
applies to all of them, given before or after the command name. Credentials in
it are never printed: usage errors, error lines, ``--debug`` tracebacks and log
lines redact them. Exit code 0 on success, 1 on any error with one line
``ckptio: error: <message>`` on stderr (a traceback only with ``--debug``).
The command line installs a logging handler for the ``ckptio`` logger while it
runs; the library itself never configures logging.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from ckptio._version import __version__
from ckptio.checkpoint import (
    IN_PROGRESS_NAME,
    MANIFEST_NAME,
    CheckpointStatus,
    find_latest_checkpoint,
    inspect_checkpoint,
    list_checkpoints,
    maybe_delete_oldest_checkpoint,
    verify_checkpoint,
)
from ckptio.errors import (
    CheckpointError,
    CkptioError,
    CorruptCheckpointError,
    InvalidArgumentError,
)
from ckptio.format import weight_files
from ckptio.format.index import read_index
from ckptio.format.safetensors_io import read_header
from ckptio.format.torch_io import read_torch_file
from ckptio.manager.export import export_checkpoint
from ckptio.storage import Storage, open_storage
from ckptio.storage.integrity import Crc32c

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

#: Bytes read per ranged request when copying.
COPY_CHUNK = 8 * 1024 * 1024


class _UsageError(Exception):
    """A command line that argparse rejected."""


#: Options whose values may hold credentials: never echoed in an error message.
_SECRET_OPTIONS = ("--storage-options", "--dst-storage-options")
_REDACTED = "<redacted>"
#: Option names (case-insensitive substrings) whose values are credentials, like ``aws_secret_access_key``.
_CREDENTIAL_WORDS = ("secret", "token", "password", "credential", "private", "access_key")


def _secret_values(args: Sequence[str]) -> list[str]:
    """The values given to :data:`_SECRET_OPTIONS` in ``args`` (also ``--opt=value`` and abbreviations).

    Over-redacting is harmless; an echoed credential is not.
    """
    values: list[str] = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if len(flag) < 3 or not flag.startswith("--") or not any(o.startswith(flag) for o in _SECRET_OPTIONS):
            continue
        if eq:
            values.append(value)
        elif i + 1 < len(args):
            values.append(args[i + 1])
    # A JSON object anywhere (say, after an empty ``--storage-options=``) is options, never a URL.
    return values + [arg for arg in args if arg.lstrip().startswith("{")]


def _credential_values(options: object, secret: bool = False) -> list[str]:
    """The strings under credential-like keys of parsed options (``secret``, ``token``, ...), at any depth."""
    if isinstance(options, dict):
        named = {k: secret or k == "key" or any(w in str(k).lower() for w in _CREDENTIAL_WORDS) for k in options}
        return [v for k, item in options.items() for v in _credential_values(item, named[k])]
    if isinstance(options, list):
        return [v for item in options for v in _credential_values(item, secret)]
    return [options] if secret and isinstance(options, str) and len(options) >= 8 else []


def _redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in ``text``, longest first so a value that holds another goes whole."""
    for value in sorted({v for v in secrets if v}, key=len, reverse=True):
        text = text.replace(value, _REDACTED)
    return text


class _RedactingFormatter(logging.Formatter):
    """A log formatter that redacts credentials (a backstop: ckptio never logs them itself)."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self.secrets = secrets  # filled in once the options are parsed

    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record), self.secrets)


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports usage errors as exceptions (exit code 1, one line).

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
        """Raise instead of printing usage and exiting with code 2; redact secret option values."""
        # `from None`: the argparse error being handled (shown by --debug) holds the unredacted text.
        raise _UsageError(_redact(message, _secret_values(self._parsed_args))) from None


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


def _storage_options(raw: str | None) -> dict[str, Any]:
    """Parse ``--storage-options``: a JSON object of fsspec options."""
    if raw is None:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"--storage-options is not valid JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise InvalidArgumentError(f"--storage-options must be a JSON object, got {type(options).__name__}")
    return options


# -- commands ---------------------------------------------------------------
def cmd_ls(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Print one line per checkpoint under ``URL/checkpoints``, oldest first."""
    entries = list_checkpoints(args.url, storage_options=options)
    if not entries:
        print(f"no checkpoints under {args.url}", file=sys.stderr)
    for e in entries:
        step = "-" if e.checkpoint_id is None else str(e.checkpoint_id)
        status = "complete" if e.is_complete else "incomplete"
        print(f"{e.name}\t{step}\t{format_size(e.size_bytes)}\t{status}\t{e.timestamp or '-'}")
    return 0


def _print_tensors(storage: Storage, files: list[str]) -> None:
    """Print ``name dtype shape file`` for every tensor of the weight files (headers only)."""
    index = read_index(storage, files[0]) if files[0].endswith(".index.json") else None
    if index is not None:
        for key, value in sorted(index["metadata"].items()):
            print(f"  index metadata: {key} = {json.dumps(value)}")
    shards = files[1:] if index is not None else files
    for shard in shards:
        if shard.endswith(".safetensors"):
            header = read_header(storage, shard)
            rows = [(n, str(e.dtype).removeprefix("torch."), str(list(e.shape))) for n, e in header.entries.items()]
        elif index is not None:  # pickled shard: the index names its tensors, no need to unpickle
            rows = [(n, "?", "?") for n, f in index["weight_map"].items() if f == shard]
        else:
            tensors = read_torch_file(storage, shard)
            rows = [(n, str(t.dtype).removeprefix("torch."), str(list(t.shape))) for n, t in tensors.items()]
        for name, dtype, shape in sorted(rows):
            print(f"  {name}\t{dtype}\t{shape}\t{shard}")


def cmd_inspect(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Print a checkpoint's status, manifest, components, and tensors (name, dtype, shape)."""
    storage = open_storage(args.path, **options)
    inspection = inspect_checkpoint(storage)
    if inspection.status is CheckpointStatus.NOT_A_CHECKPOINT and not inspection.keys:
        raise CheckpointError(f"{storage.url} holds no objects; nothing to inspect")
    print(f"{storage.url}: {inspection.status.value}")
    for problem in inspection.problems:
        print(f"  problem: {problem}")
    manifest = inspection.manifest
    if manifest is not None:
        print(f"checkpoint_id: {manifest.checkpoint_id}")
        print(f"timestamp: {manifest.timestamp}")
        print(f"world_size: {manifest.world_size}")
        print(f"size: {format_size(manifest.total_size)} in {len(manifest.files)} files")
        print(f"written by: ckptio {manifest.library_version}, torch {manifest.torch_version}")
        if manifest.metadata:
            print(f"metadata: {json.dumps(manifest.metadata, sort_keys=True)}")
        print(f"components ({len(manifest.components)}):")
        for c in manifest.components.values():
            ranks = ",".join(map(str, c.ranks))
            print(f"  {c.key}\t{c.sharing_pattern}\tranks {ranks}\t{format_size(c.size_bytes)}\t{len(c.files)} files")
    files = weight_files(storage)
    if files is None:
        print("weights: none")
        return 0
    print(f"weights ({', '.join(files)}):")
    _print_tensors(storage, files)
    return 0


def cmd_verify(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Check every file's presence, size and CRC32C; print the problems and exit 1 if any."""
    problems = verify_checkpoint(args.path, storage_options=options)
    for problem in problems:
        print(problem)
    if problems:
        raise CorruptCheckpointError(f"{args.path}: {len(problems)} problem(s) found (listed on stdout)")
    print(f"ok: {args.path}")
    return 0


def cmd_latest(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Print the newest complete checkpoint under ``URL``."""
    latest = find_latest_checkpoint(args.url, storage_options=options)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint under {args.url}")
    print(latest)
    return 0


def cmd_prune(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Delete all but the newest ``--keep`` complete checkpoints; print the deleted names."""
    if args.keep < 1:
        raise InvalidArgumentError(f"--keep must be at least 1, got {args.keep}; nothing was deleted")
    for name in maybe_delete_oldest_checkpoint(args.url, args.keep, storage_options=options):
        print(name)
    return 0


def copy_order(keys: list[str]) -> list[str]:
    """Order keys for copying: data first, then indexes, the manifest last; skip the in-progress marker.

    A destination interrupted mid-copy therefore never looks complete.
    """
    rank = {MANIFEST_NAME: 2}
    kept = [k for k in keys if k != IN_PROGRESS_NAME]
    return sorted(kept, key=lambda k: (rank.get(k, 1 if k.endswith(".index.json") else 0), k))


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], object]]:
    """Yield an ``update(n_bytes)`` callback backed by tqdm when enabled and installed."""
    if enabled:
        try:
            tqdm = importlib.import_module("tqdm").tqdm
        except ImportError:
            logger.info("tqdm is not installed; no progress bar")
        else:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr) as bar:
                yield bar.update
            return
    yield lambda n: None


def _copy_object(src: Storage, dst: Storage, key: str, expected_crc: str | None, update: Callable[[int], object]) -> None:
    """Stream one object in ranged chunks; check its size and (when known) its CRC32C before publishing."""
    size = src.size(key)
    crc = Crc32c()
    with dst.open_writer(key) as writer:
        for start in range(0, size, COPY_CHUNK):
            chunk = src.read_bytes(key, start, min(size, start + COPY_CHUNK))
            if len(chunk) != min(COPY_CHUNK, size - start):
                raise CorruptCheckpointError(f"{src.url_of(key)} changed size during the copy; destination not published")
            crc.update(chunk)
            writer.write(chunk)
            update(len(chunk))
        got = crc.hexdigest()  # checked before commit so a bad copy is never published
        if expected_crc is not None and got != expected_crc:
            raise CorruptCheckpointError(
                f"{src.url_of(key)} does not match its manifest (CRC32C expected {expected_crc}, got {got});"
                f" {dst.url} was left incomplete"
            )


def _clear_destination(dst: Storage, keys: list[str]) -> None:
    """Delete a destination's objects, manifest first, so it is never complete with stale parts."""
    for key in sorted(keys, key=lambda k: k != MANIFEST_NAME):
        dst.delete(key)


def cmd_cp(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Copy a complete checkpoint directory to another storage, publishing its manifest last."""
    src = open_storage(args.src, **options)
    dst_options = options if args.dst_storage_options is None else _storage_options(args.dst_storage_options)
    dst = open_storage(args.dst, **dst_options)
    a, b = src.url.rstrip("/") + "/", dst.url.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise InvalidArgumentError(f"source {src.url} and destination {dst.url} overlap; nothing copied")
    inspection = inspect_checkpoint(src)
    if inspection.status is not CheckpointStatus.COMPLETE:
        why = "; ".join(inspection.problems) or inspection.status.value
        raise CheckpointError(f"{src.url} is not a complete checkpoint ({why}); nothing copied")
    existing = dst.walk("")
    if existing and not args.overwrite:
        raise CheckpointError(f"{dst.url} already holds {len(existing)} files; pass --overwrite to replace them")
    keys = copy_order(inspection.keys)
    sizes = {key: src.size(key) for key in keys}
    manifest = inspection.manifest
    _clear_destination(dst, existing)
    show = bool(args.progress) or sys.stderr.isatty()
    with _progress(sum(sizes.values()), show) as update:
        for key in keys:
            record = manifest.file_record(key) if manifest is not None else None
            _copy_object(src, dst, key, record.crc32c if record is not None else None, update)
    logger.info("copied %d files (%d bytes) from %s to %s", len(keys), sum(sizes.values()), src.url, dst.url)
    print(f"copied {len(keys)} files ({format_size(sum(sizes.values()))}) to {dst.url}")
    return 0


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


def cmd_export(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Write a committed checkpoint's model as a plain Hugging Face safetensors directory."""
    dst_options = options if args.dst_storage_options is None else _storage_options(args.dst_storage_options)
    records = export_checkpoint(
        args.ckpt,
        args.dst,
        storage_options=options,
        dst_storage_options=dst_options,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"exported {len(records)} files ({format_size(sum(r.size for r in records))}) to {args.dst}")
    return 0


# -- entry point ------------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``ckptio``."""
    parser = _Parser(
        prog="ckptio", description="Crash-safe PyTorch checkpoints on local disk, S3, GCS or any fsspec URL."
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
        p = sub.add_parser(name, help=help_text, parents=[common])
        p.add_argument(dest, metavar=dest.upper())
        p.set_defaults(func=func)
    p = sub.add_parser("cp", help="copy a complete checkpoint to another storage, manifest last", parents=[common])
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--overwrite", action="store_true", help="replace files already at DST")
    p.add_argument("--dst-storage-options", metavar="JSON", help="fsspec options for DST (default: --storage-options)")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a TTY")
    p.set_defaults(func=cmd_cp)
    p = sub.add_parser("prune", help="delete all but the newest N complete checkpoints", parents=[common])
    p.add_argument("url", metavar="URL")
    p.add_argument("--keep", type=int, required=True, metavar="N", help="complete checkpoints to keep (>= 1)")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser(
        "export", help="write a checkpoint's model as a Hugging Face safetensors directory", parents=[common]
    )
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("dst", metavar="DST")
    p.add_argument(
        "--max-shard-size", type=parse_size, default=2**31, metavar="SIZE", help="largest shard (default 2GiB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace model weights already at DST")
    p.add_argument("--dst-storage-options", metavar="JSON", help="fsspec options for DST (default: --storage-options)")
    p.set_defaults(func=cmd_export)
    return parser


def _error_line(exc: BaseException) -> str:
    """One line describing ``exc``: the message of ckptio errors, type and message otherwise."""
    text = str(exc) if isinstance(exc, (CkptioError, _UsageError)) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``ckptio`` (also ``python -m ckptio``) and return the exit code (0 or 1).

    Args:
        argv: the arguments without the program name; ``sys.argv[1:]`` when None.
    """
    raw_args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw_args
    # Nothing printed below may show a credential, even one a backend puts in its error message.
    secrets = _secret_values(raw_args)
    package_logger = logging.getLogger("ckptio")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("ckptio: %(levelname)s: %(message)s", secrets))
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        args = build_parser().parse_args(raw_args)
        options = _storage_options(args.storage_options)
        secrets += _credential_values(options)
        if getattr(args, "dst_storage_options", None) is not None:
            secrets += _credential_values(_storage_options(args.dst_storage_options))
        return int(args.func(args, options))
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("ckptio: error: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the command line reports every failure as one line
        if debug:
            print(_redact(traceback.format_exc(), secrets), end="", file=sys.stderr)
        print(f"ckptio: error: {_redact(_error_line(exc), secrets)}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
