"""A loopback TCP proxy that makes a local server behave like a distant bucket.

Every accepted connection gets its own upstream connection to ``target`` and two
pumps, one per direction. Each pump

* stamps every chunk when it arrives and forwards it no earlier than
  ``rtt / 2`` later (one-way latency, so a request/response pays the full RTT);
* spends tokens from its own token bucket (``bytes_per_s``, burst ``burst``
  bytes) before forwarding, so a single connection never exceeds the bandwidth;
* buffers at most ``max_buffer`` bytes, then stops reading, so TCP flow control
  pushes back on the sender the way a real long-fat link does.

That is the shape of a real object store: one connection carries tens of MB/s
whatever the machine, and throughput comes from parallel connections.

    python benchmarks/throttle_proxy.py --target 127.0.0.1:8333 --mbps 10 --rtt-ms 20

In code it runs an event loop in a background thread::

    with ThrottleProxy("127.0.0.1", 8333, bytes_per_s=10e6, rtt_s=0.02) as proxy:
        client(endpoint_url=proxy.endpoint)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections import deque
from types import TracebackType

__all__ = ["ThrottleProxy", "TokenBucket"]

_CHUNK = 64 * 1024
_EOF = b""


class TokenBucket:
    """A token bucket: ``rate`` bytes per second with at most ``burst`` bytes saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def spend(self, size: int) -> None:
        """Wait until ``size`` bytes may be sent (``size`` may exceed the burst)."""
        while size > 0:
            self._refill()
            step = min(size, self.burst)
            if self._tokens < step:
                await asyncio.sleep((step - self._tokens) / self.rate)
                continue
            self._tokens -= step
            size -= step


class _Pipe:
    """One direction of one connection: a bounded, delayed, rate-limited FIFO."""

    def __init__(self, rate: float, delay: float, burst: int, max_buffer: int) -> None:
        self.bucket = TokenBucket(rate, burst) if rate > 0 else None
        self.delay = delay
        self.max_buffer = max_buffer
        self._queue: deque[tuple[float, bytes]] = deque()
        self._buffered = 0
        self._changed = asyncio.Event()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def read_from(self, reader: asyncio.StreamReader) -> None:
        """Move chunks from ``reader`` into the FIFO until EOF (then queue the EOF)."""
        try:
            while True:
                while self._buffered >= self.max_buffer:
                    await self._wait()
                data = await reader.read(_CHUNK)
                self._queue.append((time.monotonic(), data))
                self._buffered += len(data)
                self._changed.set()
                if not data:
                    return
        except (ConnectionError, OSError):
            self._queue.append((time.monotonic(), _EOF))
            self._changed.set()

    async def write_to(self, writer: asyncio.StreamWriter) -> None:
        """Forward queued chunks to ``writer`` once due and paid for; half-close at EOF."""
        while True:
            while not self._queue:
                await self._wait()
            arrived, data = self._queue[0]
            due = arrived + self.delay - time.monotonic()
            if due > 0:
                await asyncio.sleep(due)
            if not data:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            if self.bucket is not None:
                await self.bucket.spend(len(data))
            self._queue.popleft()
            self._buffered -= len(data)
            self._changed.set()
            writer.write(data)
            await writer.drain()


class ThrottleProxy:
    """Forward 127.0.0.1:``port`` to ``host``:``target_port`` with per-connection limits.

    Args:
        host, target_port: the real server.
        bytes_per_s: bandwidth of each connection, each direction (0: unlimited).
        rtt_s: round-trip time added; each direction delays by half of it.
        burst: token-bucket depth in bytes.
        max_buffer: bytes one direction may hold before it stops reading.
    """

    def __init__(
        self,
        host: str,
        target_port: int,
        *,
        bytes_per_s: float = 10e6,
        rtt_s: float = 0.02,
        burst: int = _CHUNK,
        max_buffer: int = 4 * 2**20,
    ) -> None:
        self.host = host
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self.rtt_s = rtt_s
        self.burst = burst
        self.max_buffer = max_buffer
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, for clients' ``endpoint_url``."""
        return f"http://127.0.0.1:{self.port}"

    def _pipe(self) -> _Pipe:
        return _Pipe(self.bytes_per_s, self.rtt_s / 2, self.burst, self.max_buffer)

    async def _handle(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(
                self.host, self.target_port
            )
        except OSError:
            client_w.close()
            return
        up, down = self._pipe(), self._pipe()
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(up.read_from(client_r)), loop.create_task(up.write_to(server_w)),
            loop.create_task(down.read_from(server_r)), loop.create_task(down.write_to(client_w)),
        ]  # fmt: skip
        try:
            # A pump that fails (a reset, a closed socket) ends the whole connection.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (server_w, client_w):
                writer.close()

    def _track(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(client_r, client_w))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> ThrottleProxy:
        """Listen on a free port of 127.0.0.1 and serve from a daemon thread."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._track, "127.0.0.1", 0)
            self.port = int(self._server.sockets[0].getsockname()[1])
            ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="throttle-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("throttle proxy did not start listening within 10 s")
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""
        loop, thread, self._thread = self._loop, self._thread, None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    def __enter__(self) -> ThrottleProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main() -> None:
    """Run a proxy in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True, help="HOST:PORT of the real server")
    parser.add_argument(
        "--mbps",
        type=float,
        default=10.0,
        help="MB/s per connection and direction (0: unlimited)",
    )
    parser.add_argument(
        "--rtt-ms", type=float, default=20.0, help="round-trip time to add"
    )
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    proxy = ThrottleProxy(
        host or "127.0.0.1",
        int(port),
        bytes_per_s=args.mbps * 1e6,
        rtt_s=args.rtt_ms / 1000,
    )
    with proxy:
        print(
            f"{proxy.endpoint} -> {args.target}: {args.mbps} MB/s per connection, {args.rtt_ms} ms RTT",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
