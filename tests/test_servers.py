"""The test servers and fixtures themselves, checked with raw s3fs / gcsfs (no ckptio)."""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

import fsspec
import pytest
from servers import BackendTarget, FakeGCSServer, ManagedProcess, SeaweedS3Server

MiB = 2**20

#: Run a test on the remote backends only (s3 and gcs) of the ``backend_url`` fixture.
remote = pytest.mark.parametrize("backend_url", ["s3", "gcs"], indirect=True)


def open_fs(target: BackendTarget) -> tuple[Any, str]:
    """The raw fsspec filesystem of ``target`` and its root path in it."""
    fs, root = fsspec.core.url_to_fs(target.url, **target.storage_options)
    fs.invalidate_cache()
    return fs, root


@remote
def test_put_get_list_delete(backend_url: BackendTarget) -> None:
    fs, root = open_fs(backend_url)
    fs.pipe_file(f"{root}/a.bin", b"alpha")
    fs.pipe_file(f"{root}/sub/b.bin", b"beta")
    assert fs.cat_file(f"{root}/a.bin") == b"alpha"
    assert sorted(fs.find(root)) == [f"{root}/a.bin", f"{root}/sub/b.bin"]
    fs.rm_file(f"{root}/a.bin")
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/a.bin")
    assert fs.find(root) == [f"{root}/sub/b.bin"]


@remote
def test_ranged_reads(backend_url: BackendTarget) -> None:
    fs, root = open_fs(backend_url)
    fs.pipe_file(f"{root}/r.bin", b"0123456789")
    assert fs.cat_file(f"{root}/r.bin", start=2, end=5) == b"234"
    assert fs.cat_file(f"{root}/r.bin", start=7, end=100) == b"789"
    assert fs.cat_file(f"{root}/r.bin", start=-3) == b"789"


@remote
def test_fresh_prefixes_do_not_see_each_other(backend_url: BackendTarget) -> None:
    fs, root = open_fs(backend_url)
    assert fs.find(root) == []  # fresh means empty
    sibling = f"{root.rsplit('/', 1)[0]}/{uuid.uuid4().hex}"
    try:
        fs.pipe_file(f"{root}/mine", b"1")
        fs.pipe_file(f"{sibling}/theirs", b"2")
        fs.invalidate_cache()
        assert fs.find(root) == [f"{root}/mine"]
        assert fs.find(sibling) == [f"{sibling}/theirs"]
    finally:
        fs.rm(sibling, recursive=True)


@remote
def test_streamed_20mib_upload(backend_url: BackendTarget) -> None:
    fs, root = open_fs(backend_url)
    data = os.urandom(20 * MiB)
    with fs.open(f"{root}/big.bin", "wb", block_size=8 * MiB) as f:
        for start in range(0, len(data), MiB):
            f.write(data[start : start + MiB])
    info = fs.info(f"{root}/big.bin")
    assert info["size"] == len(data)
    if backend_url.name == "s3":  # 8 + 8 + 4 MiB: a real multipart upload
        assert info["ETag"].strip('"').endswith("-3")
    assert fs.cat_file(f"{root}/big.bin") == data


@remote
def test_create_only_write_refuses_an_existing_object(
    backend_url: BackendTarget,
) -> None:
    # S3: PUT with If-None-Match: *; GCS: simple upload with ifGenerationMatch=0.
    # SeaweedFS answers 412 without the <Condition> element that s3fs needs to raise
    # FileExistsError, so s3fs raises a plain OSError (EINVAL) there.
    fs, root = open_fs(backend_url)
    fs.pipe_file(f"{root}/once", b"first", mode="create")
    with pytest.raises(OSError):
        fs.pipe_file(f"{root}/once", b"second", mode="create")
    assert fs.cat_file(f"{root}/once") == b"first"


@pytest.mark.parametrize("server_class", [SeaweedS3Server, FakeGCSServer])
def test_a_second_server_runs_beside_the_session_one(
    request: pytest.FixtureRequest, server_class: type[SeaweedS3Server | FakeGCSServer]
) -> None:
    session_server = request.getfixturevalue(
        "s3_server" if server_class is SeaweedS3Server else "gcs_server"
    )
    with server_class(bucket="second") as server:
        assert server.endpoint_url != session_server.endpoint_url
        fs = server.filesystem()
        fs.pipe_file("second/k", b"v")
        assert fs.cat_file("second/k") == b"v"
        assert server.process is not None
        pid, tmpdir = server.process.pid, server.process.tmpdir
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not tmpdir.exists()


def test_a_server_that_dies_reports_its_log_tail() -> None:
    process = ManagedProcess("doomed")
    try:
        process.spawn([sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
        with pytest.raises(
            RuntimeError, match=r"(?s)doomed exited with status 3.*boom"
        ):
            process.wait_until(lambda: False, timeout=30, what="nothing")
    finally:
        process.stop()
    assert not process.tmpdir.exists()
