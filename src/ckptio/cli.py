"""The ``ckptio`` command line."""

from __future__ import annotations

import argparse
import sys

from ckptio._version import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ckptio``."""
    parser = argparse.ArgumentParser(
        prog="ckptio", description="Crash-safe PyTorch checkpoints on local disk, S3, GCS or any fsspec URL."
    )
    parser.add_argument("--version", action="version", version=f"ckptio {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ckptio`` and ``python -m ckptio``; returns the exit code."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
