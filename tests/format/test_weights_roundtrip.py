"""save_checkpoint / load_checkpoint round trips on every backend, both formats."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ckptio.format import (
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    CheckpointMeta,
    get_checkpoint_metadata,
    load_checkpoint,
    save_checkpoint,
    weight_files,
    write_model_weights,
)
from ckptio.storage import Storage, open_storage
from ckptio.storage.integrity import checksum_object

FORMATS = pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])

_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    *[getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64") if hasattr(torch, n)],
]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, so float8 / NaN payloads compare bit for bit."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _every_dtype(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for dtype in _DTYPES:
        name = str(dtype).removeprefix("torch.")
        base = torch.randint(0, 100, (6, 5), generator=gen, dtype=torch.int64)
        full = (base > 50) if dtype == torch.bool else (base.to(torch.float32) / 7).to(dtype)
        out[name] = full
        out[f"{name}.scalar"] = full[1, 2].clone()
        out[f"{name}.empty"] = full[:0]
        out[f"{name}.transposed"] = full.t()  # non-contiguous
    return out


def _assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert (got[name].dtype, got[name].shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(_raw(got[name]), _raw(tensor)), name


@FORMATS
def test_every_dtype_round_trips_bit_exactly(backend_url: object, safetensors: bool) -> None:
    url, opts = backend_url.url, backend_url.storage_options  # type: ignore[attr-defined]
    state = _every_dtype(0)
    other = _every_dtype(1)
    assert not all(torch.equal(_raw(state[n]), _raw(other[n])) for n in state if state[n].numel())
    save_checkpoint(url, state, safetensors=safetensors, max_shard_size=256, storage_options=opts)
    _assert_bit_equal(load_checkpoint(url, storage_options=opts), state)  # type: ignore[arg-type]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 11, bias=False))
    model[3].weight = model[0].weight
    model.register_buffer("steps", torch.tensor(seed))
    return model


@FORMATS
@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_module_round_trip_keeps_tied_weights_one_parameter(storage: Storage, safetensors: bool, assign: bool) -> None:
    saved, target = _model(0), _model(1)
    assert not torch.equal(saved[0].weight, target[0].weight)
    save_checkpoint(storage, saved, safetensors=safetensors, max_shard_size=200)
    index = json.loads(storage.read_bytes(SAFE_WEIGHTS_INDEX_NAME if safetensors else WEIGHTS_INDEX_NAME))
    assert index["metadata"]["param_sharing"] == [["0.weight", "3.weight"]]
    assert "3.weight" not in index["weight_map"]

    load_checkpoint(storage, target, assign=assign)
    assert target[3].weight is target[0].weight
    assert isinstance(target[0].weight, nn.Parameter)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_untied_module_gets_tied_by_the_checkpoint(storage: Storage) -> None:
    saved = _model(0)
    untied = _model(1)
    untied[3].weight = nn.Parameter(untied[0].weight.detach().clone())
    save_checkpoint(storage, saved, safetensors=True)
    load_checkpoint(storage, untied)
    assert untied[3].weight is untied[0].weight
    assert torch.equal(untied[3].weight, saved[0].weight)


def test_without_param_sharing_every_name_is_stored(storage: Storage) -> None:
    save_checkpoint(storage, _model(0), safetensors=True, include_param_sharing=False)
    index = json.loads(storage.read_bytes(SAFE_WEIGHTS_INDEX_NAME))
    assert "3.weight" in index["weight_map"] and "param_sharing" not in index["metadata"]
    target = _model(1)
    load_checkpoint(storage, target)
    assert torch.equal(target[3].weight, _model(0)[0].weight)


def test_state_dict_load_includes_tied_aliases(storage: Storage) -> None:
    save_checkpoint(storage, _model(0), safetensors=True)
    loaded = load_checkpoint(storage)
    assert loaded is not None
    assert sorted(loaded) == sorted(_model(0).state_dict())
    assert loaded["3.weight"] is loaded["0.weight"]
    only = load_checkpoint(storage, keys=["3.weight"])
    assert only is not None and list(only) == ["3.weight"]
    assert torch.equal(only["3.weight"], _model(0)[0].weight)


@FORMATS
def test_layout_is_index_plus_numbered_shards_and_records_match(storage: Storage, safetensors: bool) -> None:
    records = write_model_weights(
        storage, _model(0), safetensors=safetensors, max_shard_size=2**20, metadata={"step": 7}
    )
    index_name = SAFE_WEIGHTS_INDEX_NAME if safetensors else WEIGHTS_INDEX_NAME
    shard = "model-00001-of-00001.safetensors" if safetensors else "pytorch_model-00001-of-00001.bin"
    assert sorted(storage.list("")) == sorted([index_name, shard])
    assert [r.path for r in records] == [shard, index_name]
    assert records == [checksum_object(storage, r.path) for r in records]
    assert weight_files(storage) == [index_name, shard]
    assert get_checkpoint_metadata(storage) == CheckpointMeta(index_name, True, safetensors)
    index = json.loads(storage.read_bytes(index_name))
    total = sum(t.numel() * t.element_size() for n, t in _model(0).state_dict().items() if n != "3.weight")
    assert index["metadata"]["total_size"] == total
    assert index["metadata"]["step"] == 7


def test_url_and_storage_options_work_like_a_storage(backend_url: object) -> None:
    url, opts = backend_url.url, backend_url.storage_options  # type: ignore[attr-defined]
    save_checkpoint(url, {"w": torch.arange(5)}, safetensors=True, storage_options=opts)
    assert get_checkpoint_metadata(url, storage_options=opts) == CheckpointMeta(SAFE_WEIGHTS_INDEX_NAME, True, True)
    assert torch.equal(load_checkpoint(open_storage(url, **opts))["w"], torch.arange(5))  # type: ignore[index]


def test_empty_directory_has_no_weights(storage: Storage) -> None:
    assert weight_files(storage) is None
    assert get_checkpoint_metadata(storage) is None


@FORMATS
def test_device_places_tensors(storage: Storage, safetensors: bool) -> None:
    # No accelerator in CI: the meta device proves placement goes through `device=`.
    save_checkpoint(storage, {"w": torch.arange(5.0)}, safetensors=safetensors)
    loaded = load_checkpoint(storage, device="meta")
    assert loaded is not None and loaded["w"].device == torch.device("meta")
    assert loaded["w"].shape == (5,)


def test_loading_into_a_meta_module_with_assign_materialises_it(storage: Storage) -> None:
    source = nn.Linear(2, 2)
    save_checkpoint(storage, source, safetensors=True)
    model = nn.Linear(2, 2).to("meta")
    load_checkpoint(storage, model, assign=True)
    assert model.weight.device == torch.device("cpu")
    assert torch.equal(model.weight, source.weight) and isinstance(model.weight, nn.Parameter)


def test_keys_restrict_what_loads_into_a_module(storage: Storage) -> None:
    saved, target = _model(0), _model(1)
    save_checkpoint(storage, saved, safetensors=True)
    untouched = target[1].weight.detach().clone()
    load_checkpoint(storage, target, keys=(k for k in ["2.weight", "2.bias"]))
    assert torch.equal(target[2].weight, saved[2].weight) and torch.equal(target[2].bias, saved[2].bias)
    assert torch.equal(target[1].weight, untouched)
