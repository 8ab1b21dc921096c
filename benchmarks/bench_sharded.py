"""Benchmark sharded (DTensor) saves and loads through ``ckptio.dcp`` against torch DCP's own storage.

    python benchmarks/bench_sharded.py
    python benchmarks/bench_sharded.py --size-mib 128 --proxy-size-mib 32 --repeat 2   # a quick look

For each target, ``--world-size`` (default 2) gloo ranks are spawned afresh on
the CPU (``tests/state/state_spawn.py``). They build the same FSDP2 state
(``_bench_sharded_state.py``: ``_bench_state``'s transformer, ``fully_shard``-ed
over a CPU mesh, plus AdamW after one step; every tensor a DTensor sharded on
dim 0; ``--size-mib`` in all, default 512 MiB, half per rank at world size 2;
built once per size and kept in a temp file per rank), then time ``dcp.save`` of
``get_state_dict(model, optimizer)`` and ``dcp.load`` back into it (in place) with:

* ``ckptio``: ``ckptio.dcp.StorageWriter(url)`` / ``StorageReader(url)``, defaults;
* ``dcp``: torch's own storage at its defaults: ``FileSystemWriter`` /
  ``FileSystemReader`` on local disk, ``FsspecWriter`` / ``FsspecReader`` on buckets.

Targets (``_bench_targets.py``, as ``bench_dataplane.py``): local disk (a temp
dir), S3 direct (SeaweedFS from ``tests/servers.py``; ``CKPTIO_TEST_S3_ENDPOINT``
selects your own) and S3 through ``throttle_proxy.py``, which models a distant
bucket (default 10 MB/s per connection and direction, 20 ms RTT; these rows use
the smaller ``--proxy-size-mib`` state, default 64 MiB, so the run stays short).
The emulator itself is bound by these CPUs, so only the proxy rows say how the
two compare against a real object store; direct rows are for information.

Timing: the cases take turns within one world (ckptio, DCP, DCP, ckptio, ...),
so a machine shared with other work slows both alike; each first saves and
loads a tiny state, untimed, so neither pays for first calls (planner, storage
client, connections). A run: every rank syncs the disk (local target), a
barrier, the operation, a barrier; its time is the slowest rank's, its extra
RSS the largest rank's (peak during the run minus the resident size just
before, as ``bench_dataplane.py``, with freed heap trimmed first). Each save
goes to a new directory (the previous one is removed outside the timing); loads
read the case's last save, after zeroing the state, and must bring back every
byte (CRC32C of each rank's shards, checked outside the timing). An operation
is repeated, up to ``--repeat`` times, only while the runs fit in ``--budget-s``
(estimated from its first); ``n`` says how many runs the median and min-max
cover. Local loads read what the save left in the page cache, for both cases alike.

Ratios: speed of ckptio relative to DCP = DCP's median time / ckptio's, per
target and operation, checked against: local disk >= 1x, S3 through the proxy
>= 2x (save vs ``FsspecWriter``, load vs ``FsspecReader``); direct S3 is printed
for information. The ratio of the fastest runs is shown too (local writes are
disturbed by the kernel's writeback). Results: a markdown table on stdout and in
``benchmarks/results/sharded.md``. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [
    str(HERE),
    str(HERE.parent / "tests"),
    str(HERE.parent / "tests" / "state"),
]

from _bench_report import Result, _rows, _speed  # noqa: E402
from _bench_sharded_state import CASES  # noqa: E402
from _bench_targets import LOCAL, S3, S3_PROXY, TARGETS, missing, targets  # noqa: E402

WORKER_TIMEOUT_S = 900
#: target -> the speed ratio (DCP time / ckptio time) ckptio must reach; targets not here are information.
GOALS = {LOCAL: 1.0, S3_PROXY: 2.0}


# --------------------------------------------------------------------------- on every rank


def _trim() -> None:
    """Give freed heap back to the system, so one case's leftovers do not hide the next one's peak RSS."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        if trim is not None:
            trim(0)


def _timed(op: Any, target: str, group: Any) -> tuple[float, int]:
    """Run ``op(target)`` between barriers; the slowest rank's seconds and the largest extra RSS."""
    import torch.distributed as dist
    from _bench_sharded_state import sync_disk
    from _bench_state import current_rss, peak_rss, reset_peak

    gc.collect()
    _trim()
    sync_disk(target)
    reset_peak()
    before = current_rss()
    dist.barrier(group)
    started = time.perf_counter()
    op(target)
    dist.barrier(group)
    seconds = time.perf_counter() - started
    runs: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(runs, (seconds, max(0, peak_rss() - before)), group=group)
    return max(s for s, _ in runs), max(r for _, r in runs)


def interleaved(
    cases: list[str],
    repeat: int,
    budget_s: float,
    one: Callable[[str, int], tuple[float, int]],
) -> dict[str, list[tuple[float, int]]]:
    """``one(case, round)`` for every case in turn (ABBA order), up to ``repeat`` rounds: a case
    runs again only while ``repeat`` x its first run fits in ``budget_s``."""
    from bench_dataplane import _runs

    runs: dict[str, list[tuple[float, int]]] = {case: [] for case in cases}
    wanted = dict.fromkeys(cases, repeat)
    for i in range(repeat):
        for case in cases if i % 2 == 0 else cases[::-1]:
            if i < wanted[case]:
                runs[case].append(one(case, i))
                wanted[case] = _runs(repeat, budget_s, runs[case][0][0])
    return runs


def target_ranks(rank: int, world_size: int, spec: dict[str, Any]) -> dict[str, Any]:
    """On every rank: get the state, then time saves and loads of every case, taking turns, on one target."""
    import torch
    import torch.distributed as dist
    from _bench_sharded_state import (
        dcp_op,
        dcp_state,
        digest,
        local_bytes,
        sharded_state,
        zero,
    )
    from _bench_state import reset_peak, shape_for
    from bench_dataplane import _clear

    group = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S)
    )
    root, options, cases = spec["root"], spec["options"], spec["cases"]
    model, optimizer = sharded_state(spec["size_mib"], world_size, spec["state_dir"])
    state = dcp_state(model, optimizer)
    saved = digest(state)
    sizes: list[Any] = [None] * world_size
    dist.all_gather_object(sizes, local_bytes(state), group=group)

    def clear(target: str) -> None:  # outside every timing, by one rank
        dist.barrier(group)
        if rank == 0:
            _clear(target, options)
        dist.barrier(group)

    # untimed: the first calls of DCP's planner, of the storage client and its connections
    for case in cases:
        tiny = {"warm": torch.zeros(16)}
        _timed(dcp_op(case, "save", tiny, options, group), f"{root}/warm-{case}", group)
        _timed(dcp_op(case, "load", tiny, options, group), f"{root}/warm-{case}", group)
        clear(f"{root}/warm-{case}")

    def save(case: str, i: int) -> tuple[float, int]:
        took = _timed(
            dcp_op(case, "save", state, options, group), f"{root}/{case}/run{i}", group
        )
        if i:
            clear(f"{root}/{case}/run{i - 1}")
        return took

    saves = interleaved(cases, spec["repeat"], spec["budget_s"], save)

    def load(case: str, i: int) -> tuple[float, int]:
        into = dcp_state(model, optimizer)
        zero(into)
        took = _timed(
            dcp_op(case, "load", into, options, group),
            f"{root}/{case}/run{len(saves[case]) - 1}",
            group,
        )
        if digest(into) != saved:
            raise RuntimeError(
                f"rank {rank}: {case} load #{i + 1} did not restore the saved state"
            )
        return took

    loads = interleaved(cases, spec["repeat"], spec["budget_s"], load)
    clear(root)
    common = {"bytes": sum(sizes), "shape": shape_for(spec["size_mib"]).describe(),
              "rss_method": "VmHWM after clear_refs" if reset_peak() else "ru_maxrss"}  # fmt: skip
    return {
        case: {**common, "save": saves[case], "load": loads[case]} for case in cases
    }


# --------------------------------------------------------------------------- main


def _run_target(spec: dict[str, Any], world_size: int) -> dict[str, dict[str, Any]]:
    """:func:`target_ranks` on fresh spawned ranks; a failure comes back as ``{case: {"error": ...}}``."""
    from state_spawn import run_ranks

    try:
        return dict(
            run_ranks(target_ranks, world_size, spec, timeout=WORKER_TIMEOUT_S)[0]
        )
    except AssertionError as exc:  # how run_ranks reports a failed or stuck rank
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return dict.fromkeys(
            spec["cases"], {"error": " / ".join(lines[:1] + lines[-1:])[:300]}
        )


def _measure(args: argparse.Namespace, name: str, where: Any, tmp: str) -> list[Result]:
    """Every case on target ``name`` (``where``: root URL and options, or why it is skipped)."""
    if isinstance(where, str):
        print(f"SKIP {name}: {where}", flush=True)
        return [Result(name, "*", 0, {"error": f"skipped: {where}"})]
    root, options = where
    size = args.proxy_size_mib if name.endswith("-proxy") else args.size_mib
    spec = {"cases": args.cases, "root": root, "options": options, "size_mib": size,
            "repeat": args.repeat, "budget_s": args.budget_s, "state_dir": tmp}  # fmt: skip
    started = time.monotonic()
    outcomes = _run_target(spec, args.world_size)
    print(f"{name}: {time.monotonic() - started:.1f} s", flush=True)
    measured = [Result(name, case, size, outcomes[case]) for case in args.cases]
    for result in measured:
        print(f"  {result.case:7s} {result.summary()}", flush=True)
    return measured


def run(args: argparse.Namespace) -> list[Result]:
    """Run every target on its own spawned ranks (all cases, taking turns) and collect the results."""
    with tempfile.TemporaryDirectory(prefix="ckptio-sharded-") as tmp:
        with targets(args, tmp) as found:
            return [
                r
                for name in args.targets
                for r in _measure(args, name, found[name], tmp)
            ]


def _find(results: list[Result], target: str, case: str) -> Result | None:
    return next(
        (r for r in results if r.target == target and r.case == case and not r.error),
        None,
    )


def ratio_rows(results: list[Result], targets_run: list[str]) -> list[str]:
    """Per target and operation: both medians, DCP/ckptio of the medians and of the fastest runs, verdict."""
    rows = [
        "| target | op | ckptio median s | DCP median s | speed vs DCP (median) | fastest runs | goal | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for target in targets_run:
        ours, peer = _find(results, target, "ckptio"), _find(results, target, "dcp")
        goal = GOALS.get(target)
        for op in ("save", "load"):
            ratio, best = _speed(ours, peer, op), _speed(ours, peer, op, best=True)
            times = [
                f"{r.median(op):.3f}" if r and r.median(op) else "n/a"
                for r in (ours, peer)
            ]
            if ratio is None:
                verdict = "n/a (not measured)"
            elif goal is None:
                verdict = "info only"
            else:
                verdict = "met" if ratio >= goal else "MISSED"
            shown = [f"{v:.2f}x" if v is not None else "n/a" for v in (ratio, best)]
            rows.append(f"| {target} | {op} | {times[0]} | {times[1]} | {shown[0]} | {shown[1]} | "
                        f"{f'>= {goal:g}x' if goal else '-'} | {verdict} |")  # fmt: skip
    return rows


def report(results: list[Result], args: argparse.Namespace, *, wall_s: float) -> str:
    """The markdown report: when, where, how, the table of runs and the ratios."""
    import torch

    def distinct(key: str, show: Callable[[Result], str]) -> list[str]:
        return sorted({show(r) for r in results if key in r.outcome})

    settings = " ".join(
        f"{flag} {getattr(args, flag[2:].replace('-', '_')):g}" for flag in OPTIONS
    )
    command = " ".join(["python", "benchmarks/bench_sharded.py", *sys.argv[1:]])
    lines = [
        "# Sharded save and load: ckptio.dcp vs torch DCP storage",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
        f"with {os.cpu_count()} CPUs, torch {torch.__version__}, {wall_s / 60:.1f} min in all: `{command}`.",
        f"Settings: {settings}; targets {' '.join(args.targets)}; ranks: gloo on the CPU, spawned.",
        "State: FSDP2 (`fully_shard` per block and at the root), every tensor a DTensor sharded on dim 0 "
        "over all ranks; sizes are over all ranks together.",
        *[
            f"State {s}"
            for s in distinct(
                "shape", lambda r: f"{r.size_mib} MiB: {r.outcome['shape']}"
            )
        ],
        *[f"Case {case}: {what}" for case, what in CASES.items() if case in args.cases],
        "Time: slowest rank, barrier before and after; MB/s is per byte of state (all ranks). Peak extra "
        f"RSS: largest rank, {', '.join(distinct('rss_method', lambda r: r.outcome['rss_method'])) or 'n/a'}, "
        "minus RSS just before the operation.",
        "",
        *_rows(results),
        "",
        "Speed of ckptio relative to DCP = DCP's time / ckptio's (>1 means ckptio is faster). "
        "Direct S3: both sides are bound by the emulator on these CPUs, shown for information.",
        "",
        *ratio_rows(results, args.targets),
    ]
    return "\n".join(lines)


#: numeric options: flag -> (type, default, help)
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "--world-size": (int, 2, "gloo ranks (default 2)"),
    "--size-mib": (int, 512, "state size over all ranks (default 512)"),
    "--proxy-size-mib": (int, 64, "state size on the proxied targets (default 64)"),
    "--repeat": (int, 5, "most saves and loads per (target, case) (default 5)"),
    "--budget-s": (float, 20.0, "run an operation again only while its runs so far fit in this many "
                   "seconds (estimated from the first; at least one run; default 20)"),
    "--proxy-mbps": (float, 10.0, "proxy MB/s per connection and direction (default 10)"),
    "--proxy-rtt-ms": (float, 20.0, "round-trip time the proxy adds (default 20)"),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, (kind, default, text) in OPTIONS.items():
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument(
        "--targets", nargs="+", default=[LOCAL, S3, S3_PROXY], choices=TARGETS
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if min(args.size_mib, args.proxy_size_mib, args.repeat) < 1 or args.world_size < 2:
        parser.error(
            "--size-mib, --proxy-size-mib and --repeat must be at least 1, --world-size at least 2"
        )
    return args


def main() -> None:
    """Run the benchmark and write its report."""
    args = parse_args()
    reason = missing("torch.distributed.fsdp", "FSDP2 is needed for the sharded state")
    if reason:
        raise SystemExit(reason)
    started = time.monotonic()
    results = run(args)
    text = report(results, args, wall_s=time.monotonic() - started)
    print("\n" + text)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sharded.md").write_text(text + "\n")
    print(f"\ntable written to {out / 'sharded.md'}")


if __name__ == "__main__":
    main()
