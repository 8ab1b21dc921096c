"""Run in a fresh process by test_export: how far resident memory rises while a checkpoint is exported.

Started with ``MALLOC_MMAP_THRESHOLD_`` low, so every buffer of 64 KiB or more
is its own mapping, returned to the system when freed: the peak resident set
then counts what was held at the same time, not what the allocator kept.
The peak is read from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``.

Usage: ``python export_memory_child.py OUT_DIR WARM_SRC SRC [WARM_SRC SRC ...]``;
prints a JSON list with, per SRC, the bytes the peak rose by while exporting it
and while holding every tensor of it (the control that shows the measurement sees held memory).
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_growth(fn: Callable[[], object]) -> int:
    """Bytes the resident set's peak rose above its level before ``fn``, while ``fn`` ran."""
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def main(argv: list[str]) -> None:
    from ckptio.manager.export import _open_source, export_checkpoint
    from ckptio.storage import open_storage

    out = Path(argv[0])
    results = []
    pairs = list(zip(argv[1::2], argv[2::2], strict=True))
    for i, (warm, src) in enumerate(pairs):
        export_checkpoint(warm, str(out / f"warm{i}"))  # every code path loaded before measuring

        def export(src: str = src, i: int = i) -> None:
            export_checkpoint(src, str(out / f"export{i}"), max_shard_size=32 * 2**20)

        def hold_all(src: str = src) -> None:
            source = _open_source(open_storage(src))[0]
            held = [source.read(name).clone() for name in source.metas]
            assert held

        results.append({"export": peak_growth(export), "hold_all": peak_growth(hold_all)})
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
