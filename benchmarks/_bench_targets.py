"""Where ``bench_dataplane.py`` writes: local disk, S3 and GCS, direct or through the proxy."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

LOCAL, S3, S3_PROXY, GCS, GCS_PROXY = "local", "s3", "s3-proxy", "gcs", "gcs-proxy"
TARGETS = [LOCAL, S3, S3_PROXY, GCS, GCS_PROXY]


def missing(module: str, why: str) -> str | None:
    """Why ``module`` cannot be used (not installed), or None."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed ({why})"
    return None


def _with_endpoint(name: str, options: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """``options`` pointing at ``endpoint`` instead (S3: client_kwargs; GCS: endpoint_url)."""
    options = json.loads(json.dumps(options))
    if name.startswith("s3"):
        options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
        options.pop("endpoint_url", None)
    else:
        options["endpoint_url"] = endpoint
    return options


@contextlib.contextmanager
def targets(
    args: argparse.Namespace, tmp: str
) -> Iterator[dict[str, tuple[str, dict[str, Any]] | str]]:
    """Start what the chosen targets need; yield name -> (root URL, options) or a skip reason."""
    from throttle_proxy import ThrottleProxy

    found: dict[str, tuple[str, dict[str, Any]] | str] = {}
    with contextlib.ExitStack() as stack:
        for name in args.targets:
            if name == LOCAL:
                found[name] = (os.path.join(tmp, "local"), {})
        for kind, module, factory in (
            ("s3", "s3fs", "s3_service_from_env"),
            ("gcs", "gcsfs", "gcs_service_from_env"),
        ):
            wanted = [t for t in args.targets if t.startswith(kind)]
            if not wanted:
                continue
            reason = missing(module, f"pip install 'ckptio[{kind}]'")
            service = None
            if reason is None:
                try:
                    import servers

                    service = getattr(servers, factory)()
                    stack.callback(service.stop)
                    service.start()
                except Exception as exc:  # noqa: BLE001 - reported as the skip reason
                    reason = f"{kind} server did not start: {exc}"
            for name in wanted:
                if reason is not None:
                    found[name] = reason
                    continue
                scheme = "s3" if kind == "s3" else "gs"
                root = (
                    f"{scheme}://{service.bucket}/bench-{uuid.uuid4().hex[:8]}/{name}"
                )
                options = dict(service.storage_options)
                if name.endswith("-proxy"):
                    parsed = urllib.parse.urlsplit(service.endpoint_url)
                    proxy = ThrottleProxy(
                        parsed.hostname or "127.0.0.1",
                        parsed.port or 80,
                        bytes_per_s=args.proxy_mbps * 1e6,
                        rtt_s=args.proxy_rtt_ms / 1000,
                    )
                    stack.enter_context(proxy)
                    options = _with_endpoint(name, options, proxy.endpoint)
                found[name] = (root, options)
        yield found
