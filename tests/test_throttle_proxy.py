"""The benchmark's throttling proxy: bytes pass unchanged, one connection is rate-limited."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from throttle_proxy import ThrottleProxy  # noqa: E402


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A server that answers each connection with the SHA-256 of what it got, then that data reversed."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])

    def serve_one(conn: socket.socket) -> None:
        with conn:
            data = _recv_all(conn)
            conn.sendall(hashlib.sha256(data).digest() + data[::-1])

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield port
    listener.close()


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return _recv_all(sock)


def test_bytes_pass_unchanged_both_ways(echo_port: int) -> None:
    payload = os.urandom(3 * 2**20 + 17)
    with ThrottleProxy("127.0.0.1", echo_port, bytes_per_s=0, rtt_s=0.002) as proxy:
        assert proxy.port != echo_port
        assert proxy.endpoint == f"http://127.0.0.1:{proxy.port}"
        answer = _exchange(proxy.port, payload)
    assert answer[:32] == hashlib.sha256(payload).digest()
    assert answer[32:] == payload[::-1]


def test_one_connection_is_rate_limited(echo_port: int) -> None:
    payload = os.urandom(2 * 10**6)
    with ThrottleProxy("127.0.0.1", echo_port, bytes_per_s=4e6, rtt_s=0.0) as proxy:
        started = time.monotonic()
        answer = _exchange(proxy.port, payload)
        seconds = time.monotonic() - started
    assert answer[32:] == payload[::-1]
    # 2 MB each way at 4 MB/s is about 1 s; only a generous lower bound is asserted.
    assert seconds >= 0.3


def test_stop_is_idempotent() -> None:
    proxy = ThrottleProxy("127.0.0.1", 9, bytes_per_s=1e6)
    proxy.stop()
    proxy.start()
    proxy.stop()
    proxy.stop()
