"""Suite-wide fixtures: real S3 and GCS servers, and one storage target per backend.

The S3 (SeaweedFS) and GCS (fake-gcs-server) servers start at most once per
session, and only when a test asks for them; see ``tests/servers.py`` for the
``CKPTIO_TEST_*`` variables that point the suite at servers you run yourself.
A server that fails to start errors the tests that need it (never a skip).
"""

from __future__ import annotations

import os

# Before anything imports gcsfs (also inherited by subprocesses the tests start):
# otherwise gcsfs probes each bucket over gRPC and stalls for a minute.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # so `servers` imports under any pytest import mode
    sys.path.insert(0, _TESTS_DIR)

from servers import (
    BackendTarget,
    GCSService,
    S3Service,
    gcs_service_from_env,
    s3_service_from_env,
)

BACKENDS = ["local", "memory", "s3", "gcs"]

#: Third-party warnings that the suite's ``filterwarnings = error`` must not turn into
#: failures. gcsfs hands aiohttp every upload body over 1 MiB as raw bytes on purpose.
IGNORED_WARNINGS = [
    "ignore:Sending a large body directly with raw bytes:ResourceWarning",
    # torch warns when torchdata's StatefulDataLoader calls a deprecated hook.
    "ignore:'set_vital' is deprecated:UserWarning",
]


def pytest_configure(config: pytest.Config) -> None:
    """Add :data:`IGNORED_WARNINGS` after the ini filters, so they take precedence."""
    for line in IGNORED_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Service]:
    """The session's S3 service (SeaweedFS, or ``CKPTIO_TEST_S3_ENDPOINT``)."""
    service = s3_service_from_env()
    try:
        service.start()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSService]:
    """The session's GCS service (fake-gcs-server, or ``CKPTIO_TEST_GCS_ENDPOINT``)."""
    service = gcs_service_from_env()
    try:
        service.start()
        yield service
    finally:
        service.stop()


def _target(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> BackendTarget:
    """A fresh target on backend ``name``; starts that backend's server on first use."""
    prefix = uuid.uuid4().hex
    if name == "local":
        return BackendTarget(name, str(tmp_path / "store"))
    if name == "memory":
        return BackendTarget(name, f"memory://ckptio-test/{prefix}")
    if name == "s3":
        s3: S3Service = request.getfixturevalue("s3_server")
        return BackendTarget(name, f"s3://{s3.bucket}/{prefix}", s3.storage_options)
    if name == "gcs":
        gcs: GCSService = request.getfixturevalue("gcs_server")
        return BackendTarget(name, f"gs://{gcs.bucket}/{prefix}", gcs.storage_options)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _remove_prefix(target: BackendTarget) -> None:
    """Delete everything under a non-local target (memory would leak, servers fill up)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(target.url, **target.storage_options)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[BackendTarget]:
    """A fresh, unique URL prefix on each backend: local, memory, s3, gcs."""
    target = _target(request.param, request, tmp_path)
    yield target
    if target.name != "local":  # tmp_path takes care of local
        _remove_prefix(target)


@pytest.fixture
def storage(backend_url: BackendTarget) -> Any:
    """A ckptio ``Storage`` rooted at the test's ``backend_url``."""
    from ckptio.storage import open_storage

    return open_storage(backend_url.url, **backend_url.storage_options)
