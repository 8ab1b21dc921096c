"""Benchmark ckptio's model-weights save/load against safetensors and torch, in one run.

Saves and loads a state dict (default ~256 MiB) with ckptio (safetensors and
.bin shards) and with the baselines measured in the same run on the same
machine: ``safetensors.torch.save_file``/``load_file`` and
``torch.save``/``torch.load``. Prints each time and peak-RSS growth, and the
ratios ckptio / baseline. There are no absolute thresholds: numbers depend on
the machine, ratios much less so.

Each operation runs in a fresh subprocess, so peak RSS (``ru_maxrss``) is that
operation's own. A load touches every tensor, so lazily mapped files are paid
for too.

    python benchmarks/bench_weights.py                      # local disk, temp dir
    python benchmarks/bench_weights.py --size-mib 64 --repeat 3
    python benchmarks/bench_weights.py --url s3://bucket/bench --storage-options '{"endpoint_url": "..."}'

With ``--url`` the baselines serialise in memory and upload/download whole
objects through the same storage (what a script without ckptio would do).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

CASES = {
    # name: (implementation, format)
    "ckptio-safetensors": ("ckptio", True),
    "safetensors": ("safetensors", True),
    "ckptio-bin": ("ckptio", False),
    "torch": ("torch", False),
}
PAIRS = [("ckptio-safetensors", "safetensors"), ("ckptio-bin", "torch")]


def _state(size_mib: int) -> dict[str, torch.Tensor]:
    """About ``size_mib`` MiB of float32/bfloat16 tensors shaped like a small transformer."""
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    per_layer = 4 * 1024 * 1024  # elements of one float32 16 MiB matrix
    i = 0
    while sum(t.numel() * t.element_size() for t in state.values()) < size_mib * 2**20:
        state[f"layers.{i}.mlp.weight"] = torch.randn(per_layer // 1024, 1024, generator=gen)
        state[f"layers.{i}.norm.weight"] = torch.randn(1024, generator=gen).to(torch.bfloat16)
        i += 1
    return state


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _save(case: str, target: str, options: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    impl, safetensors = CASES[case]
    if impl == "ckptio":
        from ckptio.format import save_checkpoint

        save_checkpoint(target, state, safetensors=safetensors, storage_options=options)
        return
    from ckptio.storage import open_storage

    storage = open_storage(target, **options)
    local = storage.local_path()
    if impl == "safetensors":
        import safetensors.torch

        if local:
            os.makedirs(local, exist_ok=True)
            safetensors.torch.save_file(state, os.path.join(local, "model.safetensors"))
        else:
            storage.write_bytes("model.safetensors", safetensors.torch.save(state))
    elif local:
        os.makedirs(local, exist_ok=True)
        torch.save(state, os.path.join(local, "model.pt"))
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.write_bytes("model.pt", buffer.getvalue())


def _load(case: str, target: str, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    impl, _ = CASES[case]
    if impl == "ckptio":
        from ckptio.format import load_checkpoint

        loaded = load_checkpoint(target, storage_options=options)
        assert loaded is not None
        return loaded
    from ckptio.storage import open_storage

    storage = open_storage(target, **options)
    local = storage.local_path()
    if impl == "safetensors":
        import safetensors.torch

        if local:
            return safetensors.torch.load_file(os.path.join(local, "model.safetensors"))
        return safetensors.torch.load(storage.read_bytes("model.safetensors"))
    if local:
        return torch.load(os.path.join(local, "model.pt"), weights_only=True, mmap=True)
    return torch.load(io.BytesIO(storage.read_bytes("model.pt")), weights_only=True)


def worker(op: str, case: str, target: str, options: dict[str, Any], size_mib: int) -> None:
    """Run one operation in this (fresh) process and print its time and RSS growth as JSON."""
    import safetensors.torch  # noqa: F401 - imports are not what is measured

    import ckptio.format  # noqa: F401
    from ckptio.storage import open_storage

    warm = open_storage(target, **options)  # connections are not measured either
    warm.write_bytes(".warmup", b"x")
    warm.read_bytes(".warmup")
    state = _state(size_mib) if op == "save" else None
    before = _rss()
    started = time.perf_counter()
    if op == "save":
        assert state is not None
        _save(case, target, options, state)
    else:
        loaded = _load(case, target, options)
        checksum = sum(float(t.float().sum()) for t in loaded.values())  # touch every byte
        del checksum
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rss_growth": _rss() - before}))


def _run(op: str, case: str, target: str, args: argparse.Namespace) -> dict[str, float]:
    argv = [
        sys.executable,
        __file__,
        "--worker",
        op,
        case,
        target,
        "--storage-options",
        args.storage_options,
        "--size-mib",
        str(args.size_mib),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{op} {case} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="bucket URL to benchmark against (default: a local temp dir)")
    parser.add_argument("--storage-options", default="{}", help="JSON storage options for --url")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="runs per operation; the fastest is kept")
    parser.add_argument("--worker", nargs=3, metavar=("OP", "CASE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = json.loads(args.storage_options)
    if args.worker:
        op, case, target = args.worker
        worker(op, case, target, options, args.size_mib)
        return

    with tempfile.TemporaryDirectory(prefix="ckptio-bench-") as tmp:
        root = args.url.rstrip("/") if args.url else tmp
        results: dict[tuple[str, str], dict[str, float]] = {}
        for case in CASES:
            target = f"{root}/{case}"
            for op in ("save", "load"):
                runs = [_run(op, case, target, args) for _ in range(args.repeat)]
                best = min(runs, key=lambda r: r["seconds"])
                results[(op, case)] = best
                print(f"{op:4s} {case:20s} {best['seconds']:8.3f} s   peak RSS +{best['rss_growth'] / 2**20:8.1f} MiB")
        if args.url:
            from ckptio.storage import open_storage

            open_storage(root, **options).delete_prefix("")

    print(f"\nratios (ckptio / baseline), {args.size_mib} MiB on {args.url or 'local disk'}:")
    for op in ("save", "load"):
        for ours, baseline in PAIRS:
            a, b = results[(op, ours)], results[(op, baseline)]
            time_ratio = a["seconds"] / b["seconds"]
            rss_ratio = a["rss_growth"] / max(b["rss_growth"], 1)
            print(f"  {op:4s} {ours:20s} vs {baseline:12s} time x{time_ratio:5.2f}   peak RSS growth x{rss_ratio:5.2f}")


if __name__ == "__main__":
    main()
