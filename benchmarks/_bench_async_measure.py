"""What one ``bench_async.py`` worker times: copies of the state, saves, and training steps.

Every function here runs inside the worker process that holds the state; the
orchestration and the tables live in ``bench_async.py`` and
``_bench_async_report.py``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from _bench_ops import _manager
from bench_dataplane import _clear, _runs
from torch import nn

T = TypeVar("T")


def repeated(
    run: Callable[[], T],
    repeat: int,
    budget_s: float,
    cost: Callable[[T], float],
    least: int = 1,
) -> list[T]:
    """``run()`` up to ``repeat`` times, fewer (not under ``least``) when ``repeat`` x the first run's
    ``cost`` exceeds ``budget_s``."""
    first = run()
    runs = max(min(least, repeat), _runs(repeat, budget_s, cost(first)))
    return [first, *(run() for _ in range(1, runs))]


# --------------------------------------------------------------------------- in-memory copies


def clone_once(tensors: list[torch.Tensor]) -> float:
    """Seconds to clone every tensor into freshly allocated memory (freed afterwards, untimed)."""
    gc.collect()
    started = time.perf_counter()
    copies = [t.detach().clone() for t in tensors]
    seconds = time.perf_counter() - started
    del copies
    return seconds


class Preallocated:
    """Buffers like ``tensors``, faulted in once (untimed); :meth:`copy` times one ``copy_`` of every tensor into them."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._pairs = [(torch.empty_like(t), t.detach()) for t in tensors]
        self.copy()  # touch every page: the timed copies find them mapped, as staging's reused buffers do

    def copy(self) -> float:
        started = time.perf_counter()
        for buffer, tensor in self._pairs:
            buffer.copy_(tensor)
        return time.perf_counter() - started


# --------------------------------------------------------------------------- saves


def manager(
    root: str,
    options: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    *,
    async_save: bool,
) -> Any:
    """bench_dataplane's ckptio manager (model + AdamW as a component), with ``async_save`` set."""
    made = _manager(root, options, model, opt)
    made.config = dataclasses.replace(made.config, async_save=async_save)
    return made


def settle(root: str) -> None:
    """Start from a quiet machine: no dirty pages of an earlier save (local disk), no garbage."""
    gc.collect()
    if "://" not in root:
        os.sync()


class StagingLog(logging.Handler):
    """Collects the staging seconds the manager logs at DEBUG ("staged %d bytes of state in %.3fs")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: list[float] = []
        # Nothing prints these records: the root logger has no handler (and the last-resort one skips DEBUG).
        manager_log = logging.getLogger("ckptio.manager.checkpoint_manager")
        manager_log.setLevel(logging.DEBUG)
        manager_log.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        staged = str(record.msg).startswith("staged %d bytes")
        if staged and isinstance(record.args, tuple):
            self.seconds.append(float(str(record.args[1])))

    def take(self) -> float | None:
        """The staging seconds of the last save since the previous call, if it logged any."""
        last = self.seconds[-1] if self.seconds else None
        self.seconds.clear()
        return last


STAGING = StagingLog()


def sync_save(made: Any, options: dict[str, Any]) -> float:
    """Seconds of one ``save_checkpoint()`` (synchronous manager); the checkpoint is removed afterwards, untimed."""
    settle(made.config.output_dir)
    started = time.perf_counter()
    path = made.save_checkpoint()
    seconds = time.perf_counter() - started
    _clear(path, options)
    return seconds


def async_save(
    made: Any, options: dict[str, Any], during: Callable[[Any], T]
) -> dict[str, Any]:
    """One asynchronous save: seconds inside ``save_checkpoint()`` (``blocking``), of them the copy into
    the staging buffers as the manager logs it (``staging``), seconds until the background commit
    finished (``committed``), and what ``during(made)`` returned, run on this thread while the save was
    in flight. Then ``wait_until_finished()``; the checkpoint is removed afterwards."""
    settle(made.config.output_dir)
    STAGING.take()
    started = time.perf_counter()
    path = made.save_checkpoint()
    blocking = time.perf_counter() - started
    finished = commit_clock(made)
    meanwhile = during(made)
    made.wait_until_finished()
    _clear(path, options)
    return {
        "blocking": blocking,
        "staging": STAGING.take(),
        "committed": finished[0] - started,
        "during": meanwhile,
    }


def save_in_flight(made: Any) -> bool:
    """Whether the manager's background save is still running (never blocks)."""
    return bool(made.save_in_progress)


def commit_clock(made: Any) -> list[float]:
    """A list that receives ``perf_counter()`` when the pending background save finishes.

    Reads the manager's private ``_background._pending`` future: ckptio has no public completion callback.
    """
    finished: list[float] = []
    made._background._pending.add_done_callback(
        lambda _: finished.append(time.perf_counter())
    )
    return finished


def wakeup_delays(keep_going: Callable[[], bool]) -> dict[str, float]:
    """Sleep 1 ms at a time while ``keep_going()``; how late this thread woke up each time.

    A thread that wakes late waited for the GIL or for a core: compared with the
    same probe with no save in flight, long delays during a save mean the writer
    held the GIL (or the cores) that long.
    """
    delays: list[float] = []
    started = time.perf_counter()
    while keep_going() or not delays:
        before = time.perf_counter()
        time.sleep(0.001)
        delays.append(time.perf_counter() - before - 0.001)
    delays.sort()
    wall = time.perf_counter() - started
    return {"n": len(delays), "p50_ms": 1000 * delays[len(delays) // 2], "p99_ms": 1000 * delays[len(delays) * 99 // 100],
            "max_ms": 1000 * delays[-1], "late_share": sum(d for d in delays if d > 0.002) / wall}  # fmt: skip


def wakeups_idle(seconds: float) -> dict[str, float]:
    """:func:`wakeup_delays` for ``seconds`` with no save in flight (the baseline)."""
    until = time.perf_counter() + seconds
    return wakeup_delays(lambda: time.perf_counter() < until)


def wakeups_until_saved(made: Any) -> dict[str, float]:
    """:func:`wakeup_delays` until the background save has finished."""
    return wakeup_delays(lambda: save_in_flight(made))


def steady_round(
    tensors: list[torch.Tensor],
    copier: Preallocated,
    sync_made: Any,
    async_made: Any,
    options: dict[str, Any],
) -> dict[str, Any]:
    """One of each, back to back: clone, ``copy_`` into buffers, sync save, async save (buffers reused)."""
    return {
        "clone": clone_once(tensors),
        "copy_into": copier.copy(),
        "sync": sync_save(sync_made, options),
        "wakeups_idle": wakeups_idle(0.5),
        "async": async_save(async_made, options, wakeups_until_saved),
    }


# --------------------------------------------------------------------------- training steps


class TrainingStep:
    """One training step of an MLP (``depth`` Linear ``width x width`` layers, GELU) with AdamW.

    Calling it runs forward, backward and ``optimizer.step()`` on a fixed random
    batch and returns the step's seconds.
    """

    def __init__(self, width: int, batch: int, depth: int = 4) -> None:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.model = nn.Sequential(*layers[:-1])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.inputs, self.targets = torch.randn(batch, width), torch.randn(batch, width)

    def __call__(self) -> float:
        started = time.perf_counter()
        loss = nn.functional.mse_loss(self.model(self.inputs), self.targets)
        self.optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return time.perf_counter() - started


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (``/proc/stat``); (0, 0) if unknown."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def window(run_steps: Callable[[], list[float]]) -> dict[str, Any]:
    """Run steps and say what the CPUs did meanwhile: this process's CPU cores, the machine's busy cores."""
    cpu, (busy, total) = time.process_time(), _machine_jiffies()
    started = time.perf_counter()
    steps = run_steps()
    wall = time.perf_counter() - started
    end_busy, end_total = _machine_jiffies()
    machine = (end_busy - busy) / max(end_total - total, 1) * (os.cpu_count() or 1)
    return {
        "steps": steps,
        "wall_s": wall,
        "process_cores": (time.process_time() - cpu) / wall,
        "machine_cores": machine,
    }


def steps_until_saved(made: Any, step: TrainingStep) -> list[float]:
    """Training steps from now until the background save has finished (at least one; the last may overrun it)."""
    steps = [step()]
    while save_in_flight(made):
        steps.append(step())
    return steps


def slowdown_round(
    made: Any, options: dict[str, Any], step: TrainingStep, idle_steps: int
) -> dict[str, Any]:
    """Steps with no save in flight, then an async save with steps until it commits, then idle steps again."""
    settle(made.config.output_dir)
    before = window(lambda: [step() for _ in range(idle_steps)])
    saved = async_save(
        made, options, lambda m: window(lambda: steps_until_saved(m, step))
    )
    after = window(lambda: [step() for _ in range(idle_steps)])
    return {**saved, "idle": [before, after]}
