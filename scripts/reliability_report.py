"""Run the reliability suite and write its figures into docs/reliability.md.

    .venv/bin/python scripts/reliability_report.py [--no-run] [extra pytest args]

Runs the suite's tests (real SeaweedFS and fake-gcs-server, started by the test
fixtures) with ``CKPTIO_RELIABILITY_FIGURES`` set, so each check records what it
tried once its assertions passed (``tests/reliability_figures.py``), then
replaces the part of docs/reliability.md between the ``reliability-figures``
markers with a table of those figures. ``--no-run`` renders the figures file of
the last run again. The script fails (and changes nothing) if a test fails.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
FIGURES = ROOT / "build" / "reliability-figures.jsonl"
BEGIN, END = "<!-- reliability-figures:begin -->", "<!-- reliability-figures:end -->"

#: The tests of the suite; each records its figures after its assertions.
SUITE = [
    "tests/manager/test_save_race.py",
    "tests/manager/test_server_faults.py",
    "tests/manager/test_transient_faults.py",
    "tests/manager/test_crash.py",
    "tests/manager/test_rotation_crash.py",
    "tests/cli/test_cp_crash.py",
    "tests/hostile",
]

#: Figures summed into the headline, by the key tests record them under.
HEADLINE = {
    "faults": "faults injected",
    "crashes": "processes killed",
    "inputs": "hostile inputs tried",
    "examples": "fuzzed parser inputs",
    "races": "concurrent save races",
    "data_lost": "data lost",
}
#: Keys that say where a check ran; settings end in ``_s`` (seconds); the others are counts.
WHERE = ("backend", "route", "parser")


def run_suite(extra: list[str]) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.unlink(missing_ok=True)
    env = {**os.environ, "CKPTIO_RELIABILITY_FIGURES": str(FIGURES), "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE, *extra]
    if subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode != 0:
        sys.exit("reliability suite failed: docs/reliability.md left as it was")


def load_figures() -> list[dict[str, Any]]:
    return [json.loads(line) for line in FIGURES.read_text().splitlines() if line.strip()]


def summarize(rows: list[dict[str, Any]]) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    """Totals of the headline figures, and per check: where it ran and its summed counts."""
    totals: dict[str, int] = defaultdict(int)
    checks: dict[str, dict[str, Any]] = {}
    for row in rows:
        check = checks.setdefault(row["check"], {"where": set(), "counts": defaultdict(int), "settings": {}})
        for key, value in row.items():
            if key in WHERE:
                check["where"].add(str(value))
            elif key.endswith("_s"):
                check["settings"][key] = value
            elif key not in ("check", "case") and isinstance(value, int):
                check["counts"][key] += value
                if key in HEADLINE:
                    totals[key] += value
    table = [
        (
            name,
            ", ".join(sorted(c["where"])) or "-",
            ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted({**c["counts"], **c["settings"]}.items())),
        )
        for name, c in sorted(checks.items())
    ]
    return dict(totals), table


def render(rows: list[dict[str, Any]]) -> str:
    totals, table = summarize(rows)
    ran = dt.datetime.fromtimestamp(FIGURES.stat().st_mtime, dt.timezone.utc)  # the run, not this rendering
    when = ran.strftime("%Y-%m-%d %H:%M UTC")
    headline = "; ".join(f"{label}: {totals.get(key, 0)}" for key, label in HEADLINE.items())
    lines = [
        BEGIN,
        f"Last run: {when}, `python scripts/reliability_report.py` ({len(rows)} records).",
        "",
        f"**{headline}.**",
        "",
        "| check | where | figures |",
        "|---|---|---|",
        *(f"| {name} | {where} | {counts} |" for name, where, counts in table),
        END,
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{DOC} has no {BEGIN} ... {END} section to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + section + tail)


def main(argv: list[str]) -> None:
    if "--no-run" in argv:
        argv = [a for a in argv if a != "--no-run"]
    else:
        run_suite(argv)
    rows = load_figures()
    if not rows:
        sys.exit(f"no figures recorded in {FIGURES}")
    write_doc(render(rows))
    print(f"wrote the figures of {len(rows)} records into {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
