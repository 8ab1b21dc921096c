"""A writer process killed with SIGKILL mid-stream leaves no visible object."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ckptio.storage import open_storage

PART = 5 * 2**20

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from ckptio.storage import open_storage
    url, options, part = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    storage = open_storage(url, block_size=part, **options)
    writer = storage.open_writer("victim.bin")
    writer.write(os.urandom(2 * part + 1))  # two parts are uploaded by now
    print("WRITING", flush=True)
    time.sleep(120)
    """
)


def test_sigkill_mid_stream_leaves_no_object(backend_url) -> None:
    if backend_url.name == "memory":
        pytest.skip("memory:// lives inside one process; a killed process takes it along")
    storage = open_storage(backend_url.url, **backend_url.storage_options)
    storage.write_bytes("victim.bin", b"the previous object")
    argv = [sys.executable, "-c", CHILD, backend_url.url, json.dumps(backend_url.storage_options), str(PART)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.strip() == "WRITING", f"child did not start writing: {line!r}"
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert storage.read_bytes("victim.bin") == b"the previous object"
    assert storage.list() == ["victim.bin"]
    assert storage.walk() == ["victim.bin"]
