"""Benchmark a data-parallel resume with ``load_broadcast`` against every rank reading.

    python benchmarks/bench_resume_broadcast.py                 # ~256 MiB of fp32 weights
    python benchmarks/bench_resume_broadcast.py --size-mib 64 --repeat 5

For 2 and 4 gloo ranks spawned on this machine (one simulated node:
``LOCAL_WORLD_SIZE`` = world size), each world saves a replicated model (plus a
replicated ``TrainingProgress``) once per target, outside every timing, then
times ``CheckpointManager.load_checkpoint()`` ``--repeat`` times in each mode,
alternating the modes: every rank reads the weights (the default), or rank 0
reads them and broadcasts them (``CheckpointConfig(load_broadcast=True)``).
Targets: S3 (SeaweedFS from ``tests/servers.py``; ``CKPTIO_TEST_S3_ENDPOINT``
selects your own) direct, and through ``throttle_proxy.py`` (default 10 MB/s per
connection and direction, 20 ms RTT), which models a distant bucket. Saves go
to the direct endpoint; only loads pass the proxy.

Columns: ``load s`` is the slowest rank's wall time of one ``load_checkpoint()``
(median, with min-max, of the repeats); bytes and read requests are summed over
ranks (``CountingStorage``: every request kind that moves object data, including
the manifest and component files); ``broadcast / every`` divides the broadcast
medians by the every-rank ones. Before each load the weights are zeroed, after
it every rank's weights are hashed and must equal the saved model bit for bit.

What the figures mean on one machine:

* The "interconnect" is gloo over loopback TCP between processes sharing these
  CPU cores, so the broadcast costs memory copies, not a trip over a real
  node's links (NVLink, PCIe, a NIC): the broadcast rows are optimistic.
* The proxy limits each *connection*, not the node: every rank opens its own
  connections, so ranks reading at once do not share a NIC the way they would
  on a real node (only the proxy's single thread and these cores are shared).
  Every-rank reads are therefore optimistic through the proxy, and the bytes
  and request columns (what the bucket bills and throttles) say more than time.
* Direct S3 is a local SeaweedFS on the same cores: no network at all, so
  time there is mostly CPU, shared between the ranks and the server.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import multiprocessing as mp
import os
import platform
import queue
import socket
import statistics
import sys
import time
import traceback
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckptio import (
    CheckpointConfig,
    CheckpointManager,
    SharingPattern,
    StateComponent,
    TrainingProgress,
)
from ckptio.storage import CountingStorage, open_storage

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

MiB = 2**20
MODES = ("every-rank", "broadcast")
RESULTS = HERE / "results" / "resume_broadcast.md"
_ROW = 4096  # one 16 MiB fp32 matrix is _ROW x 1024


class Replica(nn.Module):
    """About ``size_mib`` MiB of fp32 weights in 16 MiB matrices, each with a small vector."""

    def __init__(self, size_mib: int) -> None:
        super().__init__()
        full, rest = divmod(size_mib, 16)
        rows = [_ROW] * full + ([rest * _ROW // 16] if rest else [])
        self.weight = nn.ParameterList(nn.Parameter(torch.empty(r, 1024)) for r in rows)
        self.scale = nn.ParameterList(nn.Parameter(torch.empty(1024)) for _ in rows)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(generator=gen)


def digest(model: nn.Module) -> str:
    """A hash of every state tensor's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class Progress:
    """A data-parallel trainer's replicated progress, so a resume reads more than weights."""

    def __init__(self, step: int) -> None:
        self.progress = TrainingProgress()
        self.progress.step = step

    def get_state_components(self) -> list[StateComponent]:
        return [StateComponent("progress", self.progress, SharingPattern.REPLICATED)]

    def get_process_groups(self) -> dict[str, Any]:
        return {}


def resume_ranks(rank: int, world_size: int, targets: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """On every rank: save once per target, then time loads in both modes; report per-load figures."""

    def config(url: str, options: dict[str, Any], broadcast: bool = False) -> CheckpointConfig:
        return CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=args["shard_mib"] * MiB,
                                load_broadcast=broadcast)

    model = Replica(args["size_mib"])
    saved = digest(model)
    runs: list[dict[str, Any]] = []
    for name, (url, save_options, load_options) in targets.items():
        CheckpointManager(config(url, save_options), Progress(7), model=model).save_checkpoint()
        for i in range(args["repeat"]):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                with torch.no_grad():
                    for p in model.parameters():
                        p.zero_()
                counting = CountingStorage(open_storage(url, **load_options))
                provider = Progress(0)
                manager = CheckpointManager(config(url, load_options, mode == "broadcast"), provider, model=model,
                                            storage=counting)
                dist.barrier()
                began = time.perf_counter()
                manager.load_checkpoint()
                seconds = time.perf_counter() - began
                runs.append({"target": name, "mode": mode, "seconds": seconds, "bytes": counting.bytes_read,
                             "reads": counting.requests["read"], "digest": digest(model),
                             "step": provider.progress.step})
                if rank == 0:
                    print(f"  world {world_size} {name:8s} {mode:10s} #{i + 1}: rank 0 {seconds:6.2f} s", flush=True)
    return {"saved": saved, "runs": runs}


# --------------------------------------------------------------------------- spawning


def _child(rank: int, world_size: int, port: int, timeout_s: float, targets: dict[str, Any], args: dict[str, Any],
           results: Any) -> None:
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))  # one node
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            results.put((rank, "ok", resume_ranks(rank, world_size, targets, args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_world(world_size: int, targets: dict[str, Any], args: dict[str, Any], timeout_s: float) -> list[Any]:
    """Run :func:`resume_ranks` on ``world_size`` spawned gloo ranks; kill them all past ``timeout_s``.

    Raises:
        SystemExit: a rank failed (its traceback is included) or the deadline passed.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    procs = [ctx.Process(target=_child, args=(r, world_size, port, timeout_s, targets, args, results), daemon=True)
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < world_size and not any(s == "error" for s, _ in outcomes.values()):
            try:
                rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            outcomes[rank] = (status, value)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    errors = "\n".join(f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(outcomes.items()) if s == "error")
    missing = sorted(set(range(world_size)) - set(outcomes))
    if errors or missing:
        raise SystemExit(f"world {world_size} failed; ranks without a result (killed after {timeout_s:.0f} s "
                         f"or after another rank failed): {missing}\n{errors}")
    return [outcomes[r][1] for r in range(world_size)]


# --------------------------------------------------------------------------- report


def summarise(world_size: int, per_rank: list[dict[str, Any]], targets: list[str]) -> list[dict[str, Any]]:
    """One row per (target, mode): medians over repeats of max seconds and summed bytes/reads.

    Raises:
        SystemExit: a rank's loaded weights differ from the saved model, or the step was not restored.
    """
    saved = {r["saved"] for r in per_rank}
    if len(saved) != 1:
        raise SystemExit(f"world {world_size}: ranks built different models before saving: {saved}")
    expected = saved.pop()
    rows = []
    for target in targets:
        for mode in MODES:
            loads = [[run for run in r["runs"] if run["target"] == target and run["mode"] == mode] for r in per_rank]
            for rank, runs in enumerate(loads):
                bad = [run for run in runs if run["digest"] != expected or run["step"] != 7]
                if bad:
                    raise SystemExit(f"world {world_size} {target} {mode}: rank {rank} loaded weights hashing "
                                     f"{bad[0]['digest']} (step {bad[0]['step']}), saved {expected} (step 7)")
            repeats = list(zip(*loads, strict=True))  # per repeat, every rank's figures
            seconds = [max(r["seconds"] for r in rep) for rep in repeats]
            rows.append({"world": world_size, "target": target, "mode": mode,
                         "seconds": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
                         "bytes": statistics.median(sum(r["bytes"] for r in rep) for rep in repeats),
                         "reads": statistics.median(sum(r["reads"] for r in rep) for rep in repeats)})
    return rows


def table(rows: list[dict[str, Any]], size_mib: int) -> list[str]:
    lines = ["| world | target | weights MiB | mode | load s (min-max) | MiB read | read requests "
             "| time bcast/every | bytes bcast/every | requests bcast/every |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    every: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        if r["mode"] == "every-rank":
            every[(r["world"], r["target"])] = r
            ratios = "- | - | -"
        else:
            e = every[(r["world"], r["target"])]
            ratios = " | ".join(f"{r[k] / e[k]:.2f}" for k in ("seconds", "bytes", "reads"))
        lines.append(f"| {r['world']} | {r['target']} | {size_mib} | {r['mode']} | {r['seconds']:.2f} "
                     f"({r['min']:.2f}-{r['max']:.2f}) | {r['bytes'] / MiB:.0f} | {r['reads']:.0f} | {ratios} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="fp32 model weights (default 256)")
    parser.add_argument("--shard-mib", type=int, default=64, help="max_shard_size of the checkpoint (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed loads per mode; the median is reported")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--proxy-mbps", type=float, default=10.0, help="MB/s per proxied connection and direction")
    parser.add_argument("--proxy-rtt-ms", type=float, default=20.0, help="round-trip time the proxy adds")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="hard limit per world size (ranks are killed)")
    args = parser.parse_args()
    if args.size_mib < 1 or args.shard_mib < 1 or args.repeat < 1:
        parser.error("--size-mib, --shard-mib and --repeat must be at least 1")

    from servers import s3_service_from_env
    from throttle_proxy import ThrottleProxy

    began = time.monotonic()
    service = s3_service_from_env()
    service.start()
    run = f"s3://{service.bucket}/bench-resume-{uuid.uuid4().hex[:8]}"
    try:
        endpoint = urllib.parse.urlsplit(service.endpoint_url)
        proxy = ThrottleProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80,
                              bytes_per_s=args.proxy_mbps * 1e6, rtt_s=args.proxy_rtt_ms / 1000)
        with proxy:
            direct = service.storage_options
            proxied = {**direct, "client_kwargs": {**direct.get("client_kwargs", {}), "endpoint_url": proxy.endpoint}}
            proxy_name = f"s3-proxy ({args.proxy_mbps:g} MB/s/conn, {args.proxy_rtt_ms:g} ms)"
            rows: list[dict[str, Any]] = []
            for world_size in args.world_sizes:
                targets = {proxy_name: (f"{run}/proxy-w{world_size}", direct, proxied),
                           "s3": (f"{run}/direct-w{world_size}", direct, direct)}
                print(f"world {world_size}: saving once per target, then {args.repeat} loads per mode", flush=True)
                per_rank = run_world(world_size, targets, vars(args), args.timeout_s)
                rows += summarise(world_size, per_rank, list(targets))
    finally:
        with contextlib.suppress(Exception):  # a server of your own keeps the bucket, not our objects
            open_storage(run, **service.storage_options).delete_prefix("")
        service.stop()

    lines = table(rows, args.size_mib)
    print("\n" + "\n".join(lines))
    header = ["# Resume: every rank reads vs `load_broadcast` (one simulated node)", "",
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}; `{' '.join(['python', *sys.argv])}` "
              f"({args.shard_mib} MiB shards, {args.repeat} loads per mode); whole run "
              f"{time.monotonic() - began:.0f} s. Load s: slowest rank, median of the repeats; bytes and "
              "requests: summed over ranks. The script's docstring says what these mean on one machine.", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(header + lines) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
