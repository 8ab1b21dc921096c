"""Run a function on N gloo ranks (CPU, spawned processes) and collect each rank's result.

Each rank initialises a gloo process group over TCP on a free port of
127.0.0.1, runs ``worker(rank, world_size, *args)``, destroys the group and
reports through a queue. The parent kills every rank still alive when one
fails or the deadline passes, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["run_ranks", "simulated_nodes_env"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def simulated_nodes_env(world_size: int, per_node: int) -> list[dict[str, str]]:
    """``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` as torchrun sets them for nodes of ``per_node`` ranks."""
    return [{"LOCAL_RANK": str(r % per_node), "LOCAL_WORLD_SIZE": str(per_node)} for r in range(world_size)]


def _child(
    rank: int,
    world_size: int,
    port: int,
    worker: Callable[..., Any],
    args: tuple[Any, ...],
    env: dict[str, str],
    results: Any,
) -> None:
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)
    os.environ.update(env)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=30),
        )
        try:
            results.put((rank, "ok", worker(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(
    worker: Callable[..., Any],
    world_size: int,
    *args: Any,
    env: Sequence[dict[str, str]] | None = None,
    timeout: float = 60.0,
) -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``worker`` must be a module-level function (it is pickled by name).

    Raises:
        AssertionError: a rank raised (its traceback is included), or the ranks
            did not finish within ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    envs = list(env) if env is not None else [{} for _ in range(world_size)]
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, worker, args, envs[r], results), daemon=True)
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            failed = any(status == "error" for status, _ in outcomes.values())
            # a rank failed, or one died without a word: drain what is left to report, then stop
            died = any(not proc.is_alive() and r not in outcomes for r, proc in enumerate(procs))
            ended = failed or died
            wait = min(remaining, 3.0) if ended else remaining
            if wait <= 0:
                break
            try:
                rank, status, value = results.get(timeout=wait)
            except queue.Empty:
                break
            outcomes[rank] = (status, value)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()
    errors = {r: v for r, (s, v) in outcomes.items() if s == "error"}
    missing = sorted(set(range(world_size)) - set(outcomes))
    if errors or missing:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"ranks failed: {sorted(errors)}; ranks that never finished: {missing}\n{report}")
    return [outcomes[r][1] for r in range(world_size)]
