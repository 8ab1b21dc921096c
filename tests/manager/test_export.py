"""export_checkpoint: any committed checkpoint to a plain Hugging Face safetensors directory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE), str(_HERE.parent / "state")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from export_helpers import (  # noqa: E402
    Box,
    differing,
    halves,
    load_exported,
    write_sharded_checkpoint,
)
from export_workers import save_then_save_model  # noqa: E402
from state_spawn import run_ranks  # noqa: E402

from ckptio import CheckpointConfig, CheckpointManager  # noqa: E402
from ckptio.checkpoint import IN_PROGRESS_NAME, MANIFEST_NAME  # noqa: E402
from ckptio.cli import main  # noqa: E402
from ckptio.dcp.layout import METADATA_NAME, decode_metadata  # noqa: E402
from ckptio.errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    InvalidArgumentError,
)
from ckptio.format import read_model_weights  # noqa: E402
from ckptio.format.index import read_index  # noqa: E402
from ckptio.manager.export import chunk_runs, export_checkpoint  # noqa: E402
from ckptio.storage import CountingStorage, Storage, open_storage  # noqa: E402

pytestmark = pytest.mark.timeout(300)

INDEX = "model.safetensors.index.json"


class Tied(nn.Module):
    """Float32, bfloat16 and int64 state, and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 24)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight
        self.low = nn.Parameter(torch.randn(7, 5).to(torch.bfloat16))
        self.register_buffer("steps", torch.arange(6))


def _tied_model() -> Tied:
    torch.manual_seed(0)
    return Tied()


def _exported(storage: Storage, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported directory on any backend (downloaded, then opened with load_file)."""
    local = tmp_path / "downloaded"
    local.mkdir(exist_ok=True)
    for name in storage.list(""):
        (local / name).write_bytes(storage.read_bytes(name))
    return load_exported(local)


def _save(url: str, options: dict[str, Any], model: nn.Module, **config: Any) -> str:
    manager = CheckpointManager(CheckpointConfig(output_dir=url, storage_options=options, **config), None, model)
    return manager.save_checkpoint()


# -- unsharded checkpoints ---------------------------------------------------------
@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_export_unsharded_checkpoint_is_bit_identical(backend_url: Any, tmp_path: Path) -> None:
    opts = backend_url.storage_options
    model = _tied_model()
    path = _save(backend_url.url, opts, model, max_shard_size=2000)
    dst = open_storage(f"{backend_url.url}/hf", **opts)

    records = export_checkpoint(path, dst.url, storage_options=opts, max_shard_size=3000)

    index = read_index(dst, INDEX)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and [r.path for r in records] == [*shards, INDEX]
    assert index["metadata"]["param_sharing"] == [["emb.weight", "head.weight"]]
    expected = {k: v for k, v in model.state_dict().items() if k != "head.weight"}  # the alias is stored once
    assert differing(expected, _exported(dst, tmp_path)) == []
    fresh = Tied()
    read_model_weights(dst, fresh)  # ckptio loads it back, ties included
    assert fresh.head.weight is fresh.emb.weight
    assert differing(model.state_dict(), fresh.state_dict()) == []


def test_export_writes_one_file_when_everything_fits(tmp_path: Path) -> None:
    model = _tied_model()
    path = _save(str(tmp_path / "run"), {}, model, max_shard_size=2000)
    dst = tmp_path / "hf"

    records = export_checkpoint(path, dst)

    assert [r.path for r in records] == ["model.safetensors"] and sorted(os.listdir(dst)) == ["model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), "pt") as opened:
        assert opened.metadata() == {"format": "pt"}  # what transformers checks
    expected = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    assert differing(expected, load_exported(dst)) == []


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_export_converts_bin_shards_to_safetensors(backend_url: Any, tmp_path: Path) -> None:
    opts = backend_url.storage_options
    model = _tied_model()
    path = _save(backend_url.url, opts, model, max_shard_size=2000, save_safetensors=False)
    assert any(name.endswith(".bin") for name in open_storage(path, **opts).list(""))
    dst = open_storage(f"{backend_url.url}/hf", **opts)

    export_checkpoint(path, dst, storage_options=opts, max_shard_size=2500)

    assert not any(name.endswith(".bin") for name in dst.list(""))
    expected = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    assert differing(expected, _exported(dst, tmp_path)) == []


def test_export_of_trained_gpt2_opens_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens, labels=tokens).loss.backward()
    optim.step()
    path = _save(str(tmp_path / "run"), {}, model, max_shard_size=20_000)
    open_storage(path).write_bytes("config.json", model.config.to_json_string().encode())  # as a trainer does

    export_checkpoint(path, tmp_path / "hf", max_shard_size=30_000)

    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / INDEX).exists()
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert differing(model.state_dict(), loaded.state_dict()) == []
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, loaded(tokens).logits)


# -- sharded checkpoints -----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-rank FSDP2 run: a committed sharded checkpoint, and save_sharded_model's directory."""
    root = tmp_path_factory.mktemp("fsdp")
    results = run_ranks(save_then_save_model, 2, str(root / "run"), str(root / "final"), timeout=240)
    path, packed, _ = results[0]
    state = torch.load(io.BytesIO(packed), weights_only=True)
    return {"path": path, "state": state, "final": root / "final", "errors": [r[2] for r in results]}


@pytest.mark.parametrize("backend_url", ["local", "s3"], indirect=True)
def test_export_two_rank_sharded_checkpoint(
    two_rank_run: dict[str, Any], backend_url: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    opts = backend_url.storage_options
    source = two_rank_run["path"]
    metadata = decode_metadata(open_storage(source).read_bytes(METADATA_NAME), source)
    chunks = metadata.state_dict_metadata["model.4.weight"].chunks  # type: ignore[union-attr]
    assert sorted(tuple(c.offsets) for c in chunks) == [(0, 0), (0, 5)]  # split along dim 1: assembled in runs
    assert any(key.startswith("optimizer.") for key in metadata.state_dict_metadata)
    if backend_url.name != "local":
        source = f"{backend_url.url}/ckpt"
        assert main(["cp", two_rank_run["path"], source, "--dst-storage-options", json.dumps(opts)]) == 0
        capsys.readouterr()
    dst = open_storage(f"{backend_url.url}/hf", **opts)

    export_checkpoint(source, dst, storage_options=opts, max_shard_size=700)

    assert len([n for n in dst.list("") if n.endswith(".safetensors")]) > 1
    assert differing(two_rank_run["state"], _exported(dst, tmp_path)) == []  # model only, no "model." prefix


def test_save_sharded_model_writes_a_hugging_face_directory(two_rank_run: dict[str, Any]) -> None:
    final: Path = two_rank_run["final"]
    assert json.loads((final / "config.json").read_text()) == {"model_type": "tiny", "hidden": 33}
    index = json.loads((final / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert differing(two_rank_run["state"], load_exported(final)) == []
    # Writing again without overwrite is refused on every rank; a write failing part way on rank 0 is
    # raised on every rank too (rank 1 is not left waiting for gathers rank 0 gave up on).
    assert two_rank_run["errors"] == [["CheckpointExistsError", "InjectedFault"]] * 2
    assert not any(p.name.endswith(".json") for p in final.parent.joinpath(final.name + "-failing").iterdir())


def test_sharded_export_assembles_any_chunking_and_reads_only_model_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cube = torch.randn(3, 5, 7)
    tensors: dict[str, tuple[torch.Tensor, list[Box]]] = {
        # a 2x2 grid over dims 1 and 2, uneven: every chunk is a set of strided runs of the tensor
        "model.cube": (cube, [((0, 0, 0), (3, 3, 4)), ((0, 0, 4), (3, 3, 3)), ((0, 3, 0), (3, 2, 4)), ((0, 3, 4), (3, 2, 3))]),
        "model.half": (torch.randn(9, 4).to(torch.bfloat16), halves((9, 4), 0)),
        "model.wide": (torch.randn(40_000, 2), halves((40_000, 2), 1)),  # 40000 runs per chunk, in batches
        "model.ids": (torch.arange(10), halves((10,), 0)),
        "model.scalar": (torch.tensor(3.5), [((), ())]),
        "model.empty": (torch.empty(0, 3), [((0, 0), (0, 3))]),
        "optimizer.state.cube.exp_avg": (torch.randn(256, 1024), halves((256, 1024), 1)),
    }
    storage = open_storage(str(tmp_path / "ckpt"))
    write_sharded_checkpoint(storage, tensors, extra_bytes={"model._extra_state": b"not a tensor"})
    counting = CountingStorage(storage)

    export_checkpoint(counting, tmp_path / "hf", max_shard_size=100)

    expected = {k.removeprefix("model."): v for k, (v, _) in tensors.items() if k.startswith("model.")}
    assert differing(expected, load_exported(tmp_path / "hf")) == []
    model_bytes = sum(v.numel() * v.element_size() for v in expected.values())
    small = storage.size(METADATA_NAME) + storage.size(MANIFEST_NAME)
    assert counting.bytes_read <= model_bytes + small  # the optimizer's megabyte is never read
    assert counting.requests["read"] <= 30  # a chunk's runs are one stretch of its file: few reads


def test_chunk_runs_place_every_element() -> None:
    shape, itemsize = (4, 6, 5), 2
    full = torch.arange(120).reshape(shape)
    for offsets, sizes in [((0, 0, 0), (4, 6, 5)), ((1, 0, 0), (2, 6, 5)), ((0, 2, 1), (4, 3, 4)), ((3, 5, 4), (1, 1, 1))]:
        chunk = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))].reshape(-1)
        rebuilt = torch.full((120,), -1)
        for at, start, size in chunk_runs(shape, offsets, sizes, itemsize):
            rebuilt[start // itemsize : (start + size) // itemsize] = chunk[at // itemsize : (at + size) // itemsize]
        placed = rebuilt >= 0
        assert int(placed.sum()) == chunk.numel()
        assert torch.equal(rebuilt[placed], full.reshape(-1)[placed])
    assert len(list(chunk_runs(shape, (1, 0, 0), (2, 6, 5), itemsize))) == 1  # split along dim 0: one run
    assert list(chunk_runs((), (), (), 4)) == [(0, 0, 4)]


def _big_checkpoints(root: Path) -> tuple[list[str], int, int]:
    """Unsharded and sharded checkpoints of twelve 8 MiB tensors, and tiny ones to warm up with."""
    torch.manual_seed(0)
    shape = (1024, 2048)
    big = [torch.randn(shape) for _ in range(12)]
    unsharded = _save(str(root / "unsharded"), {}, nn.ParameterList(big), max_shard_size=40 * 2**20)
    warm_unsharded = _save(str(root / "warm_unsharded"), {}, nn.Linear(4, 4))
    sharded = open_storage(str(root / "sharded"))
    tensors = {f"model.{i}": (t, halves(shape, i % 2)) for i, t in enumerate(big)}  # the names ParameterList has
    write_sharded_checkpoint(sharded, tensors)
    warm_sharded = open_storage(str(root / "warm_sharded"))
    write_sharded_checkpoint(warm_sharded, {"model.w": (torch.randn(4, 4), halves((4, 4), 1))})
    largest = big[0].numel() * big[0].element_size()
    return [warm_unsharded, unsharded, warm_sharded.url, sharded.url], largest, largest * len(big)


def test_export_memory_stays_within_the_largest_tensor_plus_a_margin(tmp_path: Path) -> None:
    args, largest, total = _big_checkpoints(tmp_path)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    child = subprocess.run(
        [sys.executable, str(_HERE / "export_memory_child.py"), str(tmp_path / "out"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == 0, child.stderr
    margin = 24 * 2**20
    for kind, result in zip(("unsharded", "sharded"), json.loads(child.stdout.splitlines()[-1]), strict=True):
        assert result["hold_all"] >= 0.95 * total, (kind, result)  # the measurement sees held tensors
        assert result["export"] <= largest + margin, (kind, result)  # total is 96 MiB
    assert differing(load_exported(tmp_path / "out" / "export0"), load_exported(tmp_path / "out" / "export1")) == []


# -- refusals --------------------------------------------------------------------------
@pytest.mark.parametrize("backend_url", ["local", "memory"], indirect=True)
def test_export_refuses_uncommitted_checkpoints(backend_url: Any) -> None:
    opts = backend_url.storage_options
    path = _save(backend_url.url, opts, _tied_model(), max_shard_size=2000)
    ckpt = open_storage(path, **opts)
    crashed = open_storage(f"{backend_url.url}/checkpoints/checkpoint-2", **opts)
    for name in ckpt.list(""):  # a save that crashed after its weights: marker, no manifest
        if name != MANIFEST_NAME:
            crashed.write_bytes(name, ckpt.read_bytes(name))
    crashed.write_bytes(IN_PROGRESS_NAME, b"{}")
    dcp_crash = open_storage(f"{backend_url.url}/checkpoints/checkpoint-3", **opts)
    write_sharded_checkpoint(dcp_crash, {"model.w": (torch.ones(4, 4), halves((4, 4), 0))}, commit=False)
    ckpt.delete(next(n for n in ckpt.list("") if n.startswith("model-")))  # committed, then a shard lost
    dst = open_storage(f"{backend_url.url}/hf", **opts)

    for source in (crashed, dcp_crash, ckpt):
        with pytest.raises(IncompleteCheckpointError, match="not a committed") as info:
            export_checkpoint(source, dst)
        assert source.url in str(info.value)
    assert dst.list("") == []
    with pytest.raises(CheckpointNotFoundError, match="not a checkpoint"):
        export_checkpoint(f"{backend_url.url}/nothing", dst, storage_options=opts)


def test_export_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    model = _tied_model()
    path = _save(str(tmp_path / "run"), {}, model, max_shard_size=2000)
    dst = tmp_path / "hf"
    export_checkpoint(path, dst, max_shard_size=2500)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    assert INDEX in before and len(before) > 2

    with pytest.raises(CheckpointExistsError, match="already holds model weights"):
        export_checkpoint(path, dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before

    export_checkpoint(path, dst, overwrite=True)  # one file now: the old index and shards go
    assert sorted(os.listdir(dst)) == ["model.safetensors"]
    expected = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    assert differing(expected, load_exported(dst)) == []


def test_export_refuses_a_destination_inside_the_checkpoint(tmp_path: Path) -> None:
    path = _save(str(tmp_path / "run"), {}, _tied_model())
    with pytest.raises(InvalidArgumentError, match="overlap"):
        export_checkpoint(path, f"{path}/hf")
    with pytest.raises(InvalidArgumentError, match="max_shard_size"):
        export_checkpoint(path, tmp_path / "hf", max_shard_size=0)
    assert not (tmp_path / "hf").exists() and not (Path(path) / "hf").exists()
