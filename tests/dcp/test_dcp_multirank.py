"""ckptio.dcp with a real process group: 2 gloo CPU ranks, DTensor and fully_shard, local disk and S3."""

from __future__ import annotations

import json
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# The spawned ranks import the workers by module name, whatever pytest's import mode.
for _dir in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "state"):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

from dcp_helpers import differing, full_tensors, leaves, two_rank_worker, unpack  # noqa: E402
from state_spawn import run_ranks  # noqa: E402

import ckptio.dcp  # noqa: E402
from ckptio.checkpoint import MANIFEST_NAME, validate_checkpoint, verify_checkpoint  # noqa: E402
from ckptio.dcp.layout import METADATA_NAME  # noqa: E402
from ckptio.errors import IncompleteCheckpointError  # noqa: E402
from ckptio.storage import open_storage  # noqa: E402

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module", params=["local", "s3"])
def two_ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One spawn of 2 gloo ranks per backend: every scenario saves and loads, results by rank."""
    options: dict[str, Any] = {}
    if request.param == "local":
        url = str(tmp_path_factory.mktemp("dcp_two_ranks"))
    else:
        s3 = request.getfixturevalue("s3_server")
        url, options = f"s3://{s3.bucket}/{uuid.uuid4().hex}", s3.storage_options
    results = [unpack(packed) for packed in run_ranks(two_rank_worker, 2, url, options, timeout=300)]
    yield {"url": url, "options": options, "ranks": results}
    if request.param != "local":
        open_storage(url, **options).delete_prefix("")


def _storage(two_ranks: dict[str, Any], name: str) -> Any:
    return open_storage(f"{two_ranks['url']}/{name}", **two_ranks["options"])


def test_dtensor_round_trip_on_two_ranks(two_ranks: dict[str, Any]) -> None:
    source = full_tensors()
    for result in two_ranks["ranks"]:
        scenario = result["dtensor"]
        assert differing(scenario["before_same"], source) == ["cols", "rows"]  # zeros before the load
        assert differing(scenario["same"], source) == []
        assert scenario["extra"] == {"step": 11, "note": b"bytes-item"}
    rank0_rows, rank1_rows = (r["dtensor"]["local_rows"] for r in two_ranks["ranks"])
    assert torch.equal(rank0_rows, source["rows"][:4]) and torch.equal(rank1_rows, source["rows"][4:])


def test_dtensor_resharded_on_two_ranks(two_ranks: dict[str, Any]) -> None:
    # Saved rows Shard(0) / cols Shard(1), loaded rows Shard(1) / cols Shard(0): every read is a sub-box.
    source = full_tensors()
    for result in two_ranks["ranks"]:
        assert differing(result["dtensor"]["swapped"], source) == []


def test_fully_shard_model_and_optimizer_round_trip_on_two_ranks(two_ranks: dict[str, Any]) -> None:
    for result in two_ranks["ranks"]:
        fsdp = result["fsdp"]
        assert differing(fsdp["before"], fsdp["saved"])  # the other model really differed
        assert differing(fsdp["after"], fsdp["saved"]) == []
        assert any(".exp_avg" in key for key in leaves(fsdp["after"]["optim"]))


def test_two_rank_save_loads_unsharded_without_process_group(two_ranks: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    source = full_tensors()
    state: dict[str, Any] = {k: torch.zeros_like(v) for k, v in source.items()}
    state["rank_local"] = {"step": 0, "note": b""}
    assert differing({k: state[k] for k in source}, source) == ["cols", "replicated", "rows"]
    reader = ckptio.dcp.StorageReader(f"{two_ranks['url']}/dtensor", two_ranks["options"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP warns that no process group is used
        dcp.load(state, storage_reader=reader, no_dist=True)
    assert differing({k: state[k] for k in source}, source) == []
    assert state["rank_local"] == {"step": 11, "note": b"bytes-item"}


def test_two_rank_manifest_lists_every_rank_file_and_the_metadata(two_ranks: dict[str, Any]) -> None:
    storage = _storage(two_ranks, "dtensor")
    manifest = json.loads(storage.read_bytes(MANIFEST_NAME))
    listed = {f["path"]: f["size"] for f in manifest["files"]}
    objects = {o.key: o.size for o in storage.list_objects("")}
    assert manifest["world_size"] == 2
    assert listed == {k: v for k, v in objects.items() if k != MANIFEST_NAME}
    assert METADATA_NAME in listed
    data = sorted(k for k in listed if k.endswith(".distcp"))
    assert {k.split("-")[0] for k in data} == {"rank00000", "rank00001"}  # both ranks wrote
    assert len([k for k in data if k.startswith("rank00000")]) == 2  # files_per_rank=2


def test_two_rank_checkpoint_is_complete_until_its_manifest_goes(two_ranks: dict[str, Any]) -> None:
    for name in ("dtensor", "fsdp", "scratch"):
        assert validate_checkpoint(_storage(two_ranks, name))
        assert verify_checkpoint(_storage(two_ranks, name)) == []
    scratch = _storage(two_ranks, "scratch")
    scratch.delete(MANIFEST_NAME)  # what a crash just before the commit leaves
    assert not validate_checkpoint(scratch)
    assert verify_checkpoint(scratch) != []
    with pytest.raises(IncompleteCheckpointError, match=MANIFEST_NAME) as info:
        ckptio.dcp.StorageReader(scratch).read_metadata()
    assert scratch.url in str(info.value)
