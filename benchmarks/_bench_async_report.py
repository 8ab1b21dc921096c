"""Tables, checks and result files of ``bench_async.py``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from _bench_report import _check
from _bench_targets import LOCAL

MiB = 2**20
CLONE, COPY_INTO, SYNC = "copy: clone", "copy: copy_ into preallocated", "sync save"
FIRST, STEADY, COMMIT = (
    "async blocking, 1st save",
    "async blocking, steady",
    "async committed, steady",
)
IDLE, BUSY = "step, no save in flight", "step, save in flight"

#: (label, numerator, denominator, goal or None, where the goal applies: "local", "s3" (every s3 target) or
#: "all", statistic of each side). Fastest-run rows compare the least disturbed runs of a noisy machine.
Check = tuple[str, str, str, float | None, str, Callable[[list[float]], float]]
median = statistics.median
# fmt: off
CHECKS: list[Check] = [
    ("steady async blocking / sync save", STEADY, SYNC, 0.10, "s3", median),
    ("steady async blocking / clone of the state", STEADY, CLONE, 1.2, LOCAL, median),
    ("steady async blocking / clone, fastest runs", STEADY, CLONE, None, "", min),
    ("steady async blocking / copy_ into preallocated", STEADY, COPY_INTO, None, "", median),
    ("steady async blocking / copy_, fastest runs", STEADY, COPY_INTO, None, "", min),
    ("1st async blocking / clone of the state", FIRST, CLONE, None, "", median),
    ("async committed / sync save", COMMIT, SYNC, None, "", median),
    ("step time, save in flight / none", BUSY, IDLE, 1.2, "all", median),
]
# fmt: on


def _known(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _outside(saves: list[dict[str, Any]]) -> list[float]:
    """Seconds of each save's blocking not spent staging (planning, listing, taking the state dicts)."""
    return [s["blocking"] - s["staging"] for s in saves if s["staging"] is not None]


def series(outcome: dict[str, Any]) -> dict[str, list[float]]:
    """Every measured quantity of one target as samples, in seconds."""
    steady, rounds = outcome["steady"], outcome["slowdown"]
    return {
        CLONE: [r["clone"] for r in steady],
        COPY_INTO: [r["copy_into"] for r in steady],
        SYNC: [r["sync"] for r in steady],
        FIRST: [outcome["first"]["blocking"]],
        "async committed, 1st save": [outcome["first"]["committed"]],
        "async staging (part of blocking), 1st save": _known(
            [outcome["first"]["staging"]]
        ),
        STEADY: [r["async"]["blocking"] for r in steady],
        "async staging (part of blocking), steady": _known(
            [r["async"]["staging"] for r in steady]
        ),
        "async blocking outside staging, steady": _outside(
            [r["async"] for r in steady]
        ),
        COMMIT: [r["async"]["committed"] for r in steady],
        "async blocking, while training": [r["blocking"] for r in rounds],
        "async committed, while training": [r["committed"] for r in rounds],
        IDLE: [s for r in rounds for w in r["idle"] for s in w["steps"]],
        BUSY: [s for r in rounds for s in r["during"]["steps"]],
    }


def _table(
    columns: list[str], rows: Iterable[Sequence[object]], *, left: int = 2
) -> list[str]:
    """Markdown lines: the first ``left`` columns left-aligned, the others right-aligned."""
    align = ["---"] * left + ["---:"] * (len(columns) - left)
    lines = [f"| {' | '.join(columns)} |", f"|{'|'.join(align)}|"]
    return lines + [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]


def _done(outcomes: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((target, o) for target, o in outcomes.items() if "error" not in o)


def _raw_rows(outcomes: dict[str, dict[str, Any]]) -> list[str]:
    failed = [(t, "-", 0, o["error"], "") for t, o in outcomes.items() if "error" in o]
    measured = [
        (t, name, len(v), f"{statistics.median(v):.3f}", f"{min(v):.3f}-{max(v):.3f}")
        for t, o in _done(outcomes)
        for name, v in series(o).items()
        if v
    ]
    return _table(
        ["target", "measure", "n", "median s", "min-max s"], measured + failed
    )


def _ratio(
    samples: dict[str, list[float]],
    numerator: str,
    denominator: str,
    stat: Callable[[list[float]], float],
) -> float | None:
    top, bottom = samples.get(numerator), samples.get(denominator)
    if not top or not bottom or not stat(bottom):
        return None
    return stat(top) / stat(bottom)


def _applies(scope: str, target: str) -> bool:
    return (
        scope == "all"
        or (scope == LOCAL == target)
        or (scope == "s3" and target.startswith("s3"))
    )


def _ratio_rows(outcomes: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| check | ratio | target | verdict |", "|---|---:|---:|---|"]
    for target, outcome in outcomes.items():
        samples = series(outcome) if "error" not in outcome else {}
        for label, numerator, denominator, goal, scope, stat in CHECKS:
            value = _ratio(samples, numerator, denominator, stat)
            if goal is not None and _applies(scope, target):
                rows.append(_check(f"{target}: {label}", value, goal, at_most=True))
            elif value is not None:
                rows.append(f"| {target}: {label} | {value:.2f}x | (info) | - |")
    return rows


def _cpu_rows(outcomes: dict[str, dict[str, Any]]) -> list[str]:
    windows = [
        (target, f"round {i + 1}, {name}", w)
        for target, o in _done(outcomes)
        for i, r in enumerate(o["slowdown"])
        for name, w in (
            ("no save", r["idle"][0]),
            ("save in flight", r["during"]),
            ("no save", r["idle"][1]),
        )
    ]
    rows = [
        (
            t,
            name,
            len(w["steps"]),
            f"{w['wall_s']:.1f}",
            f"{w['process_cores']:.2f}",
            f"{w['machine_cores']:.2f}",
        )
        for t, name, w in windows
    ]
    return _table(
        ["target", "window", "steps", "wall s", "process cores", "machine cores busy"],
        rows,
    )


def _wakeup_windows(outcome: dict[str, Any]) -> Iterator[tuple[str, dict[str, float]]]:
    yield "1st save in flight", outcome["first"]["during"]
    for i, r in enumerate(outcome["steady"]):
        yield f"round {i + 1}, no save", r["wakeups_idle"]
        yield f"round {i + 1}, save in flight", r["async"]["during"]


def _wakeup_rows(outcomes: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        (
            t,
            name,
            w["n"],
            f"{w['p50_ms']:.2f}",
            f"{w['p99_ms']:.1f}",
            f"{w['max_ms']:.1f}",
            f"{100 * w['late_share']:.0f}",
        )
        for t, o in _done(outcomes)
        for name, w in _wakeup_windows(o)
    ]
    return _table(
        ["target", "window", "sleeps", "p50 ms", "p99 ms", "max ms", "time late %"],
        rows,
    )


def _header(
    outcomes: dict[str, dict[str, Any]], args: argparse.Namespace, wall_s: float
) -> list[str]:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    done = [o for o in outcomes.values() if "error" not in o]
    shapes = sorted(
        {
            f"{o['bytes'] / MiB:.0f} MiB in {o['tensors']} tensors: {o['shape']}"
            for o in done
        }
    )
    threads = f"torch threads {sorted({o['threads'] for o in done})}, in the steps {sorted({o['step_threads'] for o in done})}"
    settings = " ".join(
        f"--{k.replace('_', '-')} {v:g}"
        if isinstance(v, float)
        else f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("worker", "targets", "results_dir")
    )
    width, batch = args.step_width, args.step_batch
    return [
        f"Run {when} on {platform.machine()} with {os.cpu_count()} CPUs, {wall_s / 60:.1f} min in all.",
        f"Load average at the end (1 / 5 / 15 min): {load} (well above the CPU count: other processes competed).",
        f"Command: `{' '.join(['python', 'benchmarks/bench_async.py', *sys.argv[1:]])}`",
        f"Settings: --targets {','.join(args.targets)} {settings}",
        *[f"State {s}" for s in shapes],
        f"Step workload: MLP, 4 x Linear({width}, {width}), GELU, AdamW, batch {batch}; {threads}.",
    ]  # fmt: skip


def _sections(outcomes: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    return [
        ("Raw timings (medians of the samples; the step rows are single training steps).", _raw_rows(outcomes)),
        ("Ratios of medians (fastest runs where said); targets apply to steady-state saves (buffers reused).",
         _ratio_rows(outcomes)),
        ("CPU use while the steps ran (process: this worker's CPU time / wall; machine: /proc/stat, all processes).",
         _cpu_rows(outcomes)),
        (("Main-thread wake-ups during the async saves of the steady rounds: 1 ms sleeps, how late each woke "
         "(waiting for the GIL or a core); time late: share of the window in wake-ups over 2 ms late."),
         _wakeup_rows(outcomes)),
    ]  # fmt: skip


def _write(directory: str, name: str, content: str) -> None:
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    print(f"wrote {path}")


def report(
    outcomes: dict[str, dict[str, Any]], args: argparse.Namespace, *, wall_s: float
) -> None:
    """Write every sample to ``async.json`` (first: they survive a table that fails), then print the
    tables and write them to ``async.md``, under ``args.results_dir``."""
    _write(
        args.results_dir,
        "async.json",
        json.dumps(
            {"args": vars(args), "wall_s": wall_s, "outcomes": outcomes}, indent=1
        ),
    )
    parts = ["\n".join(_header(outcomes, args, wall_s))]
    parts += [
        f"{caption}\n\n" + "\n".join(rows) for caption, rows in _sections(outcomes)
    ]
    text = "\n\n".join(parts) + "\n"
    print(f"\n{text}")
    _write(args.results_dir, "async.md", text)
