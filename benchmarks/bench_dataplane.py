"""Benchmark ckptio's data plane against its peers and the hardware limits, in one run.

    python benchmarks/bench_dataplane.py

saves and loads a transformer-shaped model plus AdamW state (default 1 GiB:
~341 MiB fp32 weights + ~683 MiB exp_avg/exp_avg_sq; see ``_bench_state.py``)
on five targets: local disk (a temp dir), S3 (SeaweedFS) and GCS
(fake-gcs-server), each direct and through ``throttle_proxy.py``, which models a
distant bucket (default 10 MB/s per connection and direction, 20 ms RTT; the
proxy rows use ``--proxy-size-mib`` of state so the run stays short).

Cases (``_bench_ops.py``): ckptio's ``CheckpointManager`` (model + AdamW) and
``save_checkpoint``/``load_checkpoint`` (weights only, safetensors), and in the
same run on the same bytes: raw write+fsync, ``torch.save``/``load``,
safetensors, ``huggingface_hub.save_torch_state_dict``, torch DCP
(FileSystemWriter locally, FsspecWriter on buckets, defaults, ``no_dist``),
raw concurrent fsspec ``pipe``/``cat`` of the bytes, and CRC32C of the bytes.

The state is built (one real AdamW step) once per size and its bytes kept in a
temp file. Each (target, case) runs in a fresh subprocess that reads that state,
then times up to ``--repeat`` saves and up to ``--repeat`` loads; an operation
is repeated only while ``repeat x`` its first run fits in ``--budget-s`` (the
table's ``n`` column says how many runs the median and min-max cover). A load
copies into the live model and optimizer and reads every page. Peak extra RSS
is the peak resident size during one operation minus the resident size just
before it (the peak is reset per operation through ``/proc/self/clear_refs``). Results: a markdown
table on stdout and in ``benchmarks/results/dataplane.md``, a bar plot in
``benchmarks/results/dataplane.png``. Servers come from ``tests/servers.py``
(``CKPTIO_TEST_S3_ENDPOINT``/``CKPTIO_TEST_GCS_ENDPOINT`` select your own).
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false"
)  # before any gcsfs import

import argparse
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _bench_report import Result, report  # noqa: E402
from _bench_targets import GCS, LOCAL, S3, TARGETS, missing, targets  # noqa: E402

WORKER_TIMEOUT_S = 900


def _case_table() -> dict[str, tuple[Any, Any, str, str]]:
    from _bench_ops import CASES

    return CASES


# --------------------------------------------------------------------------- worker


def _clear(target: str, options: dict[str, Any]) -> None:
    """Remove ``target`` (a directory or URL prefix); outside every timing."""
    if "://" not in target:
        shutil.rmtree(target, ignore_errors=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(target, **options)
    fs.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    fs.invalidate_cache()


def _warm(root: str, options: dict[str, Any]) -> None:
    """Open the backend and one connection (not measured)."""
    if "://" in root:
        import fsspec

        fs, path = fsspec.core.url_to_fs(root, **options)
        fs.pipe_file(f"{path}/.warmup", b"x")
        fs.cat_file(f"{path}/.warmup")
        fs.rm_file(f"{path}/.warmup")


def _timed(
    op: Any, target: str, options: dict[str, Any], model: Any, opt: Any
) -> tuple[float, int]:
    from _bench_state import current_rss, peak_rss, reset_peak, touch

    gc.collect()
    if "://" not in target:
        os.sync()  # start with no dirty pages: the previous operation's writeback is not this one's
    reset_peak()
    before = current_rss()
    started = time.perf_counter()
    op(target, options, model, opt)
    if op.__name__.startswith("load"):
        touch(model, opt)
    seconds = time.perf_counter() - started
    return seconds, max(0, peak_rss() - before)


def _runs(repeat: int, budget_s: float, first_s: float) -> int:
    """How many runs of an operation: up to ``repeat``, fewer when the first alone nears the budget."""
    return min(repeat, max(1, int(budget_s // max(first_s, 1e-9))))


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Get the state, then time up to ``repeat`` saves and loads of one case on one target."""
    import torch  # noqa: F401 - imports are not measured
    from _bench_state import (
        build_state,
        flat_state,
        load_state,
        reset_peak,
        shape_for,
        state_bytes,
    )

    import ckptio  # noqa: F401

    save, load, _, _ = _case_table()[spec["case"]]
    root, options, repeat, budget = (
        spec["root"],
        spec["options"],
        spec["repeat"],
        spec["budget_s"],
    )
    size = spec["size_mib"]
    model, opt = (
        load_state(size, spec["state_file"])
        if spec.get("state_file")
        else build_state(size)
    )
    out: dict[str, Any] = {
        "bytes": state_bytes(flat_state(model, opt)),
        "shape": shape_for(size).describe(),
        "rss_method": "VmHWM after clear_refs" if reset_peak() else "ru_maxrss",
        "save": [],
        "load": [],
    }
    _warm(root, options)
    out["save"].append(_timed(save, f"{root}/run0", options, model, opt))
    for i in range(1, _runs(repeat, budget, out["save"][0][0])):
        out["save"].append(_timed(save, f"{root}/run{i}", options, model, opt))
        _clear(f"{root}/run{i - 1}", options)
    last = f"{root}/run{len(out['save']) - 1}"
    if load is not None and not spec.get("save_only"):
        out["load"].append(_timed(load, last, options, model, opt))
        for _ in range(1, _runs(repeat, budget, out["load"][0][0])):
            out["load"].append(_timed(load, last, options, model, opt))
    _clear(root, options)
    return out


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter; a failure comes back as ``{"error": ...}``."""
    argv = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}"}
    return dict(json.loads(lines[-1]))


# --------------------------------------------------------------------------- main


def _case_skip(case: str) -> str | None:
    needs = {
        "safetensors": "safetensors",
        "hf": "huggingface_hub",
        "dcp": "torch.distributed.checkpoint",
    }
    return missing(needs[case], "baseline skipped") if case in needs else None


def _plan(args: argparse.Namespace, name: str) -> list[str]:
    where = "local" if name == LOCAL else "remote"
    return [
        c
        for c, (_, _, runs_on, _) in _case_table().items()
        if runs_on in (where, "both") and c in args.cases
    ]


def _state_file(tmp: str, size_mib: int) -> str:
    """A file with the bytes of the ``size_mib`` state, built once and shared by every worker."""
    path = os.path.join(tmp, f"state-{size_mib}MiB.raw")
    if not os.path.exists(path):
        from _bench_state import write_state

        write_state(size_mib, path)
        gc.collect()
    return path


def run(args: argparse.Namespace) -> list[Result]:
    """Run every (target, case) in its own subprocess and collect the results."""
    results: list[Result] = []
    with (
        tempfile.TemporaryDirectory(prefix="ckptio-dataplane-") as tmp,
        targets(args, tmp) as found,
    ):
        for name in args.targets:
            where = found[name]
            if isinstance(where, str):
                print(f"SKIP {name}: {where}", flush=True)
                results.append(Result(name, "*", 0, {"error": f"skipped: {where}"}))
                continue
            root, options = where
            size = args.size_mib if name in (LOCAL, S3, GCS) else args.proxy_size_mib
            for case in _plan(args, name):
                skip = _case_skip(case)
                if skip:
                    print(f"SKIP {name} {case}: {skip}", flush=True)
                    results.append(
                        Result(name, case, size, {"error": f"skipped: {skip}"})
                    )
                    continue
                spec = {
                    "case": case, "root": f"{root}/{case}", "options": options, "size_mib": size,
                    "repeat": args.repeat, "budget_s": args.budget_s, "state_file": _state_file(tmp, size),
                }  # fmt: skip
                started = time.monotonic()
                outcome = _spawn(spec)
                results.append(Result(name, case, size, outcome))
                print(
                    f"{name:9s} {case:15s} {time.monotonic() - started:6.1f} s  {results[-1].summary()}",
                    flush=True,
                )
        if args.rss_4gib and LOCAL not in args.targets:
            print("SKIP local-4GiB: --rss-4gib needs the local target", flush=True)
        if args.rss_4gib and LOCAL in args.targets:
            spec = {"case": "ckptio", "root": f"{tmp}/rss4", "options": {}, "size_mib": 4096, "repeat": 1,
                    "budget_s": 0, "save_only": True}  # fmt: skip
            started = time.monotonic()
            results.append(Result("local-4GiB", "ckptio", 4096, _spawn(spec)))
            print(
                f"local-4GiB ckptio   {time.monotonic() - started:6.1f} s  {results[-1].summary()}",
                flush=True,
            )
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-mib",
        type=int,
        default=1024,
        help="state size, model + AdamW (default 1024)",
    )
    parser.add_argument(
        "--proxy-size-mib",
        type=int,
        default=64,
        help="state size on the proxied targets (default 64)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="most saves and loads per (target, case)"
    )
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="run an operation again only while the runs so far fit in this many seconds "
                        "(estimated from the first; at least one run)")  # fmt: skip
    parser.add_argument(
        "--proxy-mbps",
        type=float,
        default=10.0,
        help="proxy MB/s per connection and direction",
    )
    parser.add_argument(
        "--proxy-rtt-ms",
        type=float,
        default=20.0,
        help="round-trip time the proxy adds",
    )
    parser.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    parser.add_argument(
        "--cases", nargs="+", default=list(_case_table()), choices=list(_case_table())
    )
    parser.add_argument("--rss-4gib", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the peak RSS of a 4 GiB ckptio save on local disk")  # fmt: skip
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    """Run the benchmark, or (``--worker``) one case in this process."""
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    started = time.monotonic()
    results = run(args)
    report(results, args, wall_s=time.monotonic() - started)


if __name__ == "__main__":
    main()
