"""Count the storage requests of a save and of a resume, early and late in a run, at world sizes 1 and 4.

The metadata plane's cost must not grow with the number of checkpoints in a
run, nor with the number of ranks. This runs ``--saves`` saves (default 40)
of a small model in several shards plus optimizer, scheduler, progress and
per-rank RNG (12 files per checkpoint at world size 1), through a storage
wrapper that counts every request by kind, and prints a markdown table of the
requests of save 5 and save N, and of a resume (``load_checkpoint(None)`` in a
fresh manager, with this process's memory of manifests cleared, as a new
process would) after save 5 and after save N. Counts, not times: they are
exact and repeatable on any machine.

    python benchmarks/bench_metadata.py                          # local disk, temp dir
    python benchmarks/bench_metadata.py --url s3://bucket/bench --storage-options '{"key": ...}'
    python benchmarks/bench_metadata.py --world-sizes 1 4 --limits none 3
"""

from __future__ import annotations

import argparse
import builtins
import collections
import json
import os
import socket
import tempfile
import uuid
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ckptio
from ckptio import CheckpointConfig, CheckpointManager, SharingPattern, StateComponent, TrainingProgress
from ckptio.storage import ObjectInfo, Storage, StorageWrapper, open_storage

KINDS = ("list", "stat", "exists", "read", "write", "delete", "delete_many")


class RequestCounter(StorageWrapper):
    """Counts every storage call by kind (children share the counter)."""

    def __init__(self, inner: Storage, counts: collections.Counter[str] | None = None) -> None:
        super().__init__(inner)
        self.counts: collections.Counter[str] = counts if counts is not None else collections.Counter()

    def rewrap(self, inner: Storage) -> RequestCounter:
        return RequestCounter(inner, self.counts)

    def _count(self, kind: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.counts[kind] += 1
        return fn(*args, **kwargs)

    def write_bytes(self, key: str, data: Any) -> None:
        self._count("write", self.inner.write_bytes, key, data)

    def open_writer(self, key: str) -> Any:
        return self._count("write", self.inner.open_writer, key)

    def create_exclusive(self, key: str, data: bytes) -> None:
        self._count("write", self.inner.create_exclusive, key, data)

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._count("read", self.inner.read_bytes, key, start, end)  # type: ignore[no-any-return]

    def read_ranges(self, key: str, ranges: Any) -> builtins.list[bytes]:
        self.counts["read"] += len(ranges)
        return self.inner.read_ranges(key, ranges)

    def exists(self, key: str) -> bool:
        return self._count("exists", self.inner.exists, key)  # type: ignore[no-any-return]

    def is_file(self, key: str) -> bool:
        return self._count("exists", self.inner.is_file, key)  # type: ignore[no-any-return]

    def info(self, key: str) -> ObjectInfo:
        return self._count("stat", self.inner.info, key)  # type: ignore[no-any-return]

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self._count("list", self.inner.list, prefix)  # type: ignore[no-any-return]

    def walk(self, prefix: str = "") -> builtins.list[str]:
        return self._count("list", self.inner.walk, prefix)  # type: ignore[no-any-return]

    def list_objects(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        return self._count("list", self.inner.list_objects, prefix)  # type: ignore[no-any-return]

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        self._count("delete", self.inner.delete, key, missing_ok=missing_ok)

    def delete_many(self, keys: Any) -> None:
        self._count("delete_many", self.inner.delete_many, keys)

    def delete_prefix(self, prefix: str) -> None:
        self.counts["list"] += 1
        self._count("delete_many", self.inner.delete_prefix, prefix)

    def local_path(self, key: str = "") -> str | None:
        return None  # every read goes through the counter


class Trainer:
    """Six linear layers in several shards, optimizer, scheduler, progress and per-rank RNG."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2)
        self.progress = TrainingProgress()
        self.rng = ckptio.RNGState()

    def get_state_components(self) -> list[StateComponent]:
        return [
            StateComponent("optimizer", self.optimizer, SharingPattern.REPLICATED),
            StateComponent("scheduler", self.scheduler, SharingPattern.GLOBAL),
            StateComponent("progress", self.progress, SharingPattern.GLOBAL),
            StateComponent("rng", self.rng, SharingPattern.PER_RANK),
        ]

    def get_process_groups(self) -> dict[str, Any]:
        return {}


def _forget_manifests() -> None:
    forget = getattr(ckptio.checkpoint.manifest, "forget_manifests", None)
    if forget is not None:  # a library without a manifest memory has nothing to forget
        forget()


def run_one_rank(url: str, options: dict[str, Any], saves: int, measure: tuple[int, ...], limit: int | None) -> dict[str, dict[str, int]]:
    """Save ``saves`` times; record the requests of the measured saves and of a resume after each."""
    trainer = Trainer()
    counter = RequestCounter(open_storage(url, **options))
    config = CheckpointConfig(output_dir=url, storage_options=options, save_total_limit=limit, max_shard_size=16 * 1024)
    manager = CheckpointManager(config, trainer, model=trainer.model, storage=counter)
    out: dict[str, dict[str, int]] = {}
    for number in range(1, saves + 1):
        counter.counts.clear()
        manager.save_checkpoint()
        if number in measure:
            out[f"save {number}"] = dict(counter.counts)
            _forget_manifests()
            counter.counts.clear()
            fresh = Trainer()
            CheckpointManager(config, fresh, model=fresh.model, storage=counter).load_checkpoint(None)
            out[f"resume at {number}"] = dict(counter.counts)
    return out


def _rank_main(rank: int, world_size: int, port: int, args: tuple[Any, ...], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        queue.put((rank, run_one_rank(*args)))
    finally:
        dist.destroy_process_group()


def run(url: str, options: dict[str, Any], saves: int, measure: tuple[int, ...], limit: int | None, world_size: int) -> dict[str, dict[str, int]]:
    """Per measured point, the requests summed over every rank."""
    if world_size == 1:
        return run_one_rank(url, options, saves, measure, limit)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, (url, options, saves, measure, limit), queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    total: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for _, per_point in results:
        for point, counts in per_point.items():
            total[point].update(counts)
    return {point: dict(c) for point, c in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="run directory (default: a temp dir); a fresh prefix is added per case")
    parser.add_argument("--storage-options", default="{}", help="JSON fsspec options for --url")
    parser.add_argument("--saves", type=int, default=40)
    parser.add_argument("--early", type=int, default=5)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--limits", nargs="+", default=["none", "3"], help="save_total_limit values ('none': keep all)")
    args = parser.parse_args()
    options = json.loads(args.storage_options)
    base = args.url or tempfile.mkdtemp(prefix="ckptio-bench-meta-")
    measure = (args.early, args.saves)
    print(f"ckptio {ckptio.__version__} at {os.path.dirname(ckptio.__file__)}; storage {base}")
    print("| world | keep | point | " + " | ".join(KINDS) + " | total |")
    print("|---|---|---|" + "---|" * (len(KINDS) + 1))
    for world_size in args.world_sizes:
        for limit_text in args.limits:
            limit = None if limit_text == "none" else int(limit_text)
            url = f"{base.rstrip('/')}/{uuid.uuid4().hex[:8]}"
            counts = run(url, options, args.saves, measure, limit, world_size)
            for point in (f"save {args.early}", f"save {args.saves}", f"resume at {args.early}", f"resume at {args.saves}"):
                c = counts.get(point, {})
                cells = " | ".join(str(c.get(k, 0)) for k in KINDS)
                print(f"| {world_size} | {limit_text} | {point} | {cells} | {sum(c.values())} |", flush=True)


if __name__ == "__main__":
    main()
