"""Benchmark asynchronous saves: how long they block the trainer, and how much they slow its steps.

    python benchmarks/bench_async.py
    python benchmarks/bench_async.py --size-mib 256 --repeat 2 --targets local,s3

For the state ``bench_dataplane.py`` saves (default 1 GiB: a transformer's fp32
weights + AdamW ``exp_avg``/``exp_avg_sq``, see ``_bench_state.py``), saved
through the same ``CheckpointManager`` as its ``ckptio`` case (the model, and
the optimizer as a component of a ``StatefulProvider``; default config, with
``async_save`` off or on), on local disk (a temp dir), S3 (SeaweedFS from
``tests/servers.py``; ``CKPTIO_TEST_S3_ENDPOINT`` selects your own) and S3
through ``throttle_proxy.py`` (a distant bucket: default 10 MB/s per connection
and direction, 20 ms RTT, with the smaller ``--proxy-size-mib`` state). The
state is built once and kept in a temp file; each target runs in a fresh worker
process that reads it, then measures:

1. The 1st async save: ``save_checkpoint()`` with ``async_save=True`` on a new
   manager, which allocates its staging buffers: the time inside the call (the
   trainer is blocked), of it the staging copy (the seconds the manager logs at
   DEBUG), and the time until the background commit finished (a callback on the
   manager's private ``_background._pending`` future).
2. Steady rounds, each back to back on the same state: ``copy`` (a) every
   tensor cloned into freshly allocated memory, (b) ``copy_`` into buffers
   allocated and faulted in once beforehand (what reused staging buffers cost
   at best); ``sync save``: ``save_checkpoint()`` with ``async_save=False``;
   an async save on the manager of step 1 (2nd and later saves: buffers
   reused), timed as in step 1. ``wait_until_finished()`` is called after the
   save has finished, outside the blocking time; until then this thread sleeps
   1 ms at a time and records how late it wakes (also for 0.5 s with no save in
   flight): a thread that wakes late waited for the GIL or for a core.
3. Step rounds: a training step workload, timed with no save in flight and
   while an async save (steady state) is in flight. The workload is an MLP of
   its own (4 Linear ``--step-width`` x ``--step-width`` layers, GELU, AdamW,
   batch ``--step-batch``; ~50-200 ms a step on 2 idle cores, with torch's
   default threads unless ``--step-threads``), not the checkpointed
   transformer: that one has no forward pass and its AdamW step alone moves
   several GB of memory, far above such a step; and the background writer reads
   only the staged copy, so what the trainer's tensors hold does not matter to
   it. What the step time measures is contention for the cores, memory
   bandwidth and the GIL. A round runs ``--idle-steps`` steps, starts the save,
   runs steps until it has finished (polling the same private future: ckptio
   has no public non-blocking check; the last step may overrun the commit),
   then ``--idle-steps`` steps again; per window it records the cores this
   process used and those the whole machine had busy (``/proc/stat``).

Rounds follow bench_dataplane's rule: up to ``--repeat``, fewer when
``--repeat`` x the first round exceeds ``--budget-s`` (but at least two steady
rounds). Before every save the page cache is synced (local); each checkpoint
is deleted after it committed, outside every timing. Tables: raw medians
(min-max); ratios of medians (and of the fastest runs, which a busy machine
disturbs least) with a verdict against the targets (S3: steady async blocking
<= 10 % of a sync save; local: steady async blocking <= 1.2 x one clone of the
state; every target: median step time with a save in flight <= 1.2 x without);
CPU use in the step windows; wake-up delays. On stdout and in
``benchmarks/results/async.md``, every sample in ``async.json``.

On one machine the S3 server shares the CPUs with the trainer, so the S3 step
slowdown includes the server's work, which a real bucket does elsewhere; and
SeaweedFS is plain HTTP, over which botocore also hashes every payload (SHA-256
for SigV4), which it skips over HTTPS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _bench_targets import GCS, LOCAL, S3, S3_PROXY, TARGETS, targets
from bench_dataplane import _state_file, _warm

WORKER_TIMEOUT_S = 900
DEFAULT_TARGETS = [LOCAL, S3, S3_PROXY]


# --------------------------------------------------------------------------- worker


def _say(spec: dict[str, Any], what: str, *seconds: float) -> None:
    shown = " ".join(f"{s:.3f}" for s in seconds)
    print(f"  {spec['target']:9s} {what:40s} {shown}", flush=True)


def _steady(
    spec: dict[str, Any], tensors: list[Any], model: Any, opt: Any, made: Any
) -> list[dict[str, Any]]:
    from _bench_async_measure import Preallocated, manager, repeated, steady_round

    sync_made = manager(
        f"{spec['root']}/sync", spec["options"], model, opt, async_save=False
    )
    copier = Preallocated(tensors)
    rounds = repeated(lambda: steady_round(tensors, copier, sync_made, made, spec["options"]), spec["repeat"],
                      spec["budget_s"], cost=lambda r: r["sync"] + r["async"]["committed"], least=2)  # fmt: skip
    for r in rounds:
        done = r["async"]
        what = "clone, copy_, sync, async blocked, done s"
        _say(
            spec,
            what,
            r["clone"],
            r["copy_into"],
            r["sync"],
            done["blocking"],
            done["committed"],
        )
    return rounds


def _slowdown(spec: dict[str, Any], made: Any) -> list[dict[str, Any]]:
    import torch
    from _bench_async_measure import TrainingStep, repeated, slowdown_round

    if spec["step_threads"]:
        torch.set_num_threads(spec["step_threads"])
    step = TrainingStep(spec["step_width"], spec["step_batch"])
    for _ in range(3):  # warm-up: allocator, thread pool
        step()
    rounds = repeated(lambda: slowdown_round(made, spec["options"], step, spec["idle_steps"]),
                      spec["repeat"], spec["budget_s"], cost=lambda r: r["committed"])  # fmt: skip
    for r in rounds:
        idle, busy = [s for w in r["idle"] for s in w["steps"]], r["during"]["steps"]
        what = f"step s, median idle, busy ({len(busy)} steps)"
        _say(spec, what, statistics.median(idle), statistics.median(busy))
    return rounds


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Read the state, then time copies, sync saves, async saves and steps on one target."""
    import torch
    from _bench_async_measure import async_save, manager, wakeups_until_saved
    from _bench_state import flat_state, load_state, shape_for, state_bytes

    model, opt = load_state(spec["size_mib"], spec["state_file"])
    flat = flat_state(model, opt)
    out: dict[str, Any] = {"bytes": state_bytes(flat), "tensors": len(flat), "threads": torch.get_num_threads(),
                           "shape": shape_for(spec["size_mib"]).describe()}  # fmt: skip
    _warm(spec["root"], spec["options"])
    with manager(
        f"{spec['root']}/async", spec["options"], model, opt, async_save=True
    ) as made:
        out["first"] = async_save(made, spec["options"], wakeups_until_saved)
        _say(
            spec,
            "1st async save blocked, done s",
            out["first"]["blocking"],
            out["first"]["committed"],
        )
        out["steady"] = _steady(spec, list(flat.values()), model, opt, made)
        out["slowdown"] = _slowdown(spec, made)
        out["step_threads"] = torch.get_num_threads()
    return out


def _spawn(spec: dict[str, Any], tmp: str) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter (its progress lines stream through); errors as ``{"error"}``."""
    result = Path(tmp) / f"result-{spec['target']}.json"
    argv = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps({**spec, "result": str(result)}),
    ]
    try:
        code = subprocess.run(argv, timeout=WORKER_TIMEOUT_S, check=False).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    if code != 0 or not result.exists():
        return {"error": f"worker exited with {code} (its traceback is above)"}
    return dict(json.loads(result.read_text()))


# --------------------------------------------------------------------------- main


def _spec(
    args: argparse.Namespace, name: str, where: tuple[str, dict[str, Any]], tmp: str
) -> dict[str, Any]:
    size = args.size_mib if name in (LOCAL, S3, GCS) else args.proxy_size_mib
    return {"target": name, "root": where[0], "options": where[1], "size_mib": size,
            "state_file": _state_file(tmp, size), "repeat": args.repeat, "budget_s": args.budget_s,
            "step_width": args.step_width, "step_batch": args.step_batch, "idle_steps": args.idle_steps,
            "step_threads": args.step_threads}  # fmt: skip


def _measure(
    args: argparse.Namespace, name: str, where: Any, tmp: str
) -> dict[str, Any]:
    """One target's outcome: measured in a worker, or why it was skipped."""
    if isinstance(where, str):
        print(f"SKIP {name}: {where}", flush=True)
        return {"error": f"skipped: {where}"}
    print(f"{name}: measuring in a fresh process", flush=True)
    started = time.monotonic()
    outcome = _spawn(_spec(args, name, where, tmp), tmp)
    print(
        f"{name}: {time.monotonic() - started:.1f} s {outcome.get('error', '')}",
        flush=True,
    )
    return outcome


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Measure every target in its own worker process; target -> outcome (or ``{"error"}``)."""
    with (
        tempfile.TemporaryDirectory(prefix="ckptio-async-") as tmp,
        targets(args, tmp) as found,
    ):
        return {name: _measure(args, name, found[name], tmp) for name in args.targets}


def _target_list(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {unknown}; choose from {TARGETS}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    # fmt: off
    add("--size-mib", type=int, default=1024, help="state size, model + AdamW (default 1024)")
    add("--proxy-size-mib", type=int, default=64, help="state size on the proxied targets (default 64)")
    add("--repeat", type=int, default=3, help="most steady rounds (copies, sync and async save) and step rounds")
    add("--budget-s", type=float, default=45.0, help="run a round again only while repeat x the first round fits "
        "in this many seconds (default 45; at least 2 steady rounds)")
    add("--targets", nargs="+", type=_target_list, default=[DEFAULT_TARGETS],
        help=f"where to save, space- or comma-separated, of {TARGETS} (default {','.join(DEFAULT_TARGETS)})")
    add("--step-width", type=int, default=1024, help="width of the training-step MLP (default 1024)")
    add("--step-batch", type=int, default=512, help="batch of the training-step MLP (default 512)")
    add("--step-threads", type=int, default=0, help="torch threads of the training steps (default 0: torch's own)")
    add("--idle-steps", type=int, default=10, help="steps before and after each save in flight (default 10)")
    add("--proxy-mbps", type=float, default=10.0, help="proxy MB/s per connection and direction")
    add("--proxy-rtt-ms", type=float, default=20.0, help="round-trip time the proxy adds")
    add("--results-dir", default=str(HERE / "results"))
    add("--worker", help=argparse.SUPPRESS)
    # fmt: on
    args = parser.parse_args(argv)
    args.targets = list(dict.fromkeys(n for group in args.targets for n in group))
    return args


def main() -> None:
    """Run the benchmark, or (``--worker``) one target in this process."""
    args = parse_args()
    if not args.worker:
        from _bench_async_report import report

        started = time.monotonic()
        report(run(args), args, wall_s=time.monotonic() - started)
    else:
        spec = json.loads(args.worker)
        Path(spec["result"]).write_text(json.dumps(worker(spec)))


if __name__ == "__main__":
    main()
