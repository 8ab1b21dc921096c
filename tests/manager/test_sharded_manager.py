"""The manager with an FSDP2 (DTensor) model: every rank writes its shards; resumes at other world sizes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "state"))

from sharded_workers import load_sharded, save_sharded, unpack  # noqa: E402
from state_spawn import run_ranks  # noqa: E402

from ckptio.checkpoint import read_manifest  # noqa: E402
from ckptio.storage import open_storage  # noqa: E402

pytestmark = pytest.mark.timeout(400)


def _differing(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path} keys"]
        return [d for k in a for d in _differing(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differing(x, y, f"{path}/{i}")]
    if isinstance(a, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [path]
    return [] if a == b else [path]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_two_rank_fsdp_checkpoint_resumes_on_two_one_and_four_ranks(tmp_path: Path, async_save: bool) -> None:
    url = str(tmp_path / "run")
    (path, packed), _ = run_ranks(save_sharded, 2, url, async_save, timeout=180)
    saved = unpack(packed)
    manifest = read_manifest(open_storage(path))
    assert manifest is not None
    assert manifest.metadata["sharded_state"]["optimizers"] == ["optimizer"]
    names = {r.path for r in manifest.files}
    assert {"rank00000-part000.distcp", "rank00001-part000.distcp", "dcp_metadata.pkl"} <= names
    assert not any(n.endswith(".safetensors") for n in names)  # no rank held the whole model
    assert "optimizer" not in manifest.components  # saved sharded, with the model
    for world_size in (2, 1, 4):
        for rank, packed_state in enumerate(run_ranks(load_sharded, world_size, url, timeout=180)):
            loaded = unpack(packed_state)
            assert _differing(loaded, saved) == [], (world_size, rank)
