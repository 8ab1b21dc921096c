"""Resolve a URL or local path to a :class:`~ckptio.storage.base.Storage`."""

from __future__ import annotations

import os
from typing import Any

from ckptio.errors import InvalidArgumentError, MissingDependencyError
from ckptio.storage.base import Storage
from ckptio.storage.local import LocalStorage
from ckptio.storage.retry import RetryPolicy
from ckptio.storage.wrapper import RetryingStorage

__all__ = ["open_storage", "resolve_storage", "split_url"]

#: Which ``pip install 'ckptio[extra]'`` brings the package a protocol needs.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_LISTING_CACHE_OFF = {"use_listings_cache": False}
#: Connections an S3 client keeps open (parts of several files upload at once).
_S3_CONNECTIONS = 64


def split_url(url_or_path: str) -> tuple[str, str]:
    """Split into ``(protocol, path)``; local paths and ``file://`` give ``"file"``."""
    if "://" not in url_or_path:
        return "file", url_or_path
    protocol, _, rest = url_or_path.partition("://")
    if not protocol:
        raise InvalidArgumentError(f"cannot open storage {url_or_path!r}: empty protocol")
    return protocol.lower(), rest


def open_storage(
    url_or_path: str | os.PathLike[str],
    *,
    retry: RetryPolicy | None = None,
    block_size: int | None = None,
    **storage_options: Any,
) -> Storage:
    """Open the storage rooted at ``url_or_path``.

    Local paths and ``file://`` URLs give a :class:`LocalStorage`; every other
    protocol goes through fsspec, with ``storage_options`` passed to the
    filesystem (credentials, ``endpoint_url``, ...).

    Args:
        url_or_path: a local directory or a URL such as ``s3://bucket/run``.
        retry: retry policy for transient backend errors (object stores).
        block_size: part size of streaming uploads on object stores.
        **storage_options: options for the fsspec filesystem, plus ``stall_timeout_s``: how long
            a request may go without an answer before it fails (:mod:`ckptio.storage.stall`).
            Local paths take one option, ``follow_symlinks`` (default False): read symbolic
            links that lead outside the opened directory, as a Hugging Face hub cache has.

    Raises:
        MissingDependencyError: the backend package is not installed; names the extra.
        InvalidArgumentError: the URL cannot be parsed.
    """
    url = os.fspath(url_or_path)
    protocol, path = split_url(url)
    if protocol in ("file", "local"):
        return LocalStorage(path, follow_symlinks=bool(storage_options.get("follow_symlinks", False)))

    import fsspec  # local import keeps `import ckptio` light

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f"pip install 'ckptio[{extra}]'" if extra else f"install the fsspec backend for {protocol!r}"
        raise MissingDependencyError(f"cannot open {url!r}: {exc}; {hint}") from exc
    except ValueError as exc:
        raise InvalidArgumentError(f"cannot open {url!r}: unknown protocol {protocol!r}") from exc

    from ckptio.storage.fsspec_backend import FsspecStorage
    from ckptio.storage.stall import client_timeouts, pop_stall_timeout

    options = dict(storage_options)
    stall = pop_stall_timeout(options)
    fs = cls(**client_timeouts(protocol, _filesystem_options(protocol, options), stall))
    root = cls._strip_protocol(url)
    policy = retry or RetryPolicy()
    backend = FsspecStorage(fs, root, protocol=protocol, block_size=block_size, retry=policy, stall_timeout_s=stall)
    return RetryingStorage(backend, policy)


def _filesystem_options(protocol: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The user's options, plus ckptio's defaults where the user set none."""
    options = {**_LISTING_CACHE_OFF, **storage_options}
    if protocol in ("s3", "s3a"):
        # botocore keeps 10 connections by default: fewer than the parts and files in flight.
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", _S3_CONNECTIONS)
        # botocore >= 1.36 computes a CRC32 of every upload part on the client's one I/O thread (and
        # asks servers for checksums some S3-compatible stores reject); every file already carries
        # ckptio's CRC32C in the manifest, so only the checksums a request requires are computed.
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        options["config_kwargs"] = config
    return options


def resolve_storage(target: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None) -> Storage:
    """Accept a Storage as is, or open a URL/path with ``storage_options``."""
    if isinstance(target, Storage):
        return target
    return open_storage(target, **(storage_options or {}))
