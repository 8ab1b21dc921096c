"""StateStager: private host copies of training state, reusable buffers, and the host-memory check.

CPU only: the pinned-memory path of CUDA tensors is not exercised here.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from ckptio import InsufficientMemoryError
from ckptio.format import create_sharing_metadata
from ckptio.state.staging import StateStager, available_host_memory, state_nbytes

MiB = 2**20


def _bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as raw bytes (bit-for-bit comparison, NaN payloads and -0.0 included)."""
    return bytes(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


def _plenty() -> int:
    return 2**40


class _TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight  # one Parameter, two names in the state dict


def _varied_tensors() -> dict[str, torch.Tensor]:
    floats = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, 3.5])
    nan_payload = torch.tensor([0x7FC00001, 0x7F800123], dtype=torch.int32).view(torch.float32)
    return {
        "f32": torch.cat([floats, nan_payload]),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(-5, 5),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "param": nn.Parameter(torch.randn(3, 2)),
    }


# -- the copy ---------------------------------------------------------------


def test_staged_tensors_are_bit_identical_and_do_not_share_memory_with_the_source() -> None:
    source = _varied_tensors()
    staged = StateStager(available_memory=_plenty).stage({"m": source})["m"]
    assert list(staged) == list(source)
    for name, tensor in source.items():
        copy = staged[name]
        assert copy.dtype == tensor.dtype and copy.shape == tensor.shape, name
        assert _bytes(copy) == _bytes(tensor), name
        assert not _shares_memory(copy, tensor), name


def test_mutating_the_source_after_stage_leaves_the_copy_unchanged() -> None:
    source = _varied_tensors()
    before = {name: _bytes(t) for name, t in source.items()}
    staged = StateStager(available_memory=_plenty).stage({"m": source})["m"]
    with torch.no_grad():
        for tensor in source.values():
            if tensor.dtype is torch.bool:
                tensor.logical_not_()
            else:
                tensor.zero_()
                tensor.add_(1)
    for name, tensor in source.items():
        assert _bytes(tensor) != before[name], name  # the source did change ...
        assert _bytes(staged[name]) == before[name], name  # ... the copy did not


Pair = namedtuple("Pair", ["first", "second"])


class Typed(NamedTuple):
    weight: torch.Tensor
    note: str


def _assert_same_structure(copy: Any, source: Any, where: str = "") -> None:
    assert type(copy) is type(source), where
    if isinstance(source, torch.Tensor):
        assert copy is not source, where
        assert torch.equal(copy, source), where
    elif isinstance(source, dict):
        assert list(copy) == list(source), where  # same keys, same order
        for key in source:
            _assert_same_structure(copy[key], source[key], f"{where}/{key}")
    elif isinstance(source, (list, tuple)):
        assert len(copy) == len(source), where
        for i, (c, s) in enumerate(zip(copy, source, strict=True)):
            _assert_same_structure(c, s, f"{where}/{i}")
    else:
        assert copy == source, where


def test_nested_containers_keep_their_types_and_structure() -> None:
    t = torch.arange(6.0)
    source: dict[str, Any] = {
        "model": OrderedDict([("z.weight", t + 1), ("a.weight", t + 2), ("m.bias", t + 3)]),
        "optimizer": {
            "state": {1: {"step": torch.tensor(3.0), "exp_avg": t + 4}, 0: {"step": torch.tensor(1.0)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1], "betas": (0.9, 0.999)}],
        },
        "misc": [t + 5, (t + 6, [t + 7, {"deep": (t + 8,)}]), Pair(t + 9, "x"), Typed(t + 10, "note")],
        "empty": {"list": [], "tuple": (), "dict": {}, "od": OrderedDict()},
        "scalars": {"none": None, "int": 3, "float": 0.5, "str": "s"},
    }
    staged = StateStager(available_memory=_plenty).stage(source)
    _assert_same_structure(staged, source)
    assert staged["misc"][2].first is not source["misc"][2].first
    assert staged["misc"][3].weight.data_ptr() != source["misc"][3].weight.data_ptr()


def test_non_tensor_mutable_leaves_are_deep_copied() -> None:
    class Holder:
        def __init__(self) -> None:
            self.items = [1, 2]

    source: dict[str, Any] = {
        "sampler": {"order": [3, 1, 2], "seen": {"a": [1]}, "ids": {4, 5}, "holder": Holder()},
        "nested": [[1, 2], {"k": [3]}],
        "pair": ([1], {"x": 1}),
    }
    staged = StateStager(available_memory=_plenty).stage(source)
    source["sampler"]["order"].append(99)
    source["sampler"]["seen"]["a"].append(99)
    source["sampler"]["seen"]["b"] = []
    source["sampler"]["ids"].add(99)
    source["sampler"]["holder"].items.append(99)
    source["nested"][0].append(99)
    source["nested"][1]["k"].append(99)
    source["pair"][0].append(99)
    source["pair"][1]["y"] = 2
    assert staged["sampler"]["order"] == [3, 1, 2]
    assert staged["sampler"]["seen"] == {"a": [1]}
    assert staged["sampler"]["ids"] == {4, 5}
    assert staged["sampler"]["holder"] is not source["sampler"]["holder"]
    assert staged["sampler"]["holder"].items == [1, 2]
    assert staged["nested"] == [[1, 2], {"k": [3]}]
    assert staged["pair"] == ([1], {"x": 1})


def test_numpy_array_leaves_are_deep_copied() -> None:
    np = pytest.importorskip("numpy")
    source = {"rng": {"state": np.arange(5, dtype=np.uint32), "pos": 3}}
    staged = StateStager(available_memory=_plenty).stage(source)
    source["rng"]["state"][:] = 0
    assert staged["rng"]["state"] is not source["rng"]["state"]
    assert staged["rng"]["state"].tolist() == [0, 1, 2, 3, 4]


def test_tied_weights_stay_one_tensor_in_the_copy() -> None:
    model = _TiedModel()
    state = model.state_dict()
    assert state["embed.weight"].data_ptr() == state["head.weight"].data_ptr()
    stager = StateStager(available_memory=_plenty)
    staged = stager.stage({"weights": state, "components": [{"alias": state["embed.weight"]}]})
    weights = staged["weights"]
    tied = weights["embed.weight"]
    assert weights["head.weight"].data_ptr() == tied.data_ptr()
    assert staged["components"][0]["alias"].data_ptr() == tied.data_ptr()
    assert not _shares_memory(tied, state["embed.weight"])
    assert weights["mid.weight"].data_ptr() != tied.data_ptr()
    assert stager.nbytes == sum(t.nbytes for name, t in state.items() if name != "head.weight")


def test_a_staged_state_dict_still_reports_its_tied_weights() -> None:
    model = _TiedModel()
    state = model.state_dict()
    expected = [["embed.weight", "head.weight"]]
    assert create_sharing_metadata(state) == expected
    assert create_sharing_metadata(model) == expected
    staged = StateStager(available_memory=_plenty).stage({"weights": state})["weights"]
    assert create_sharing_metadata(staged) == expected


def test_distinct_views_of_one_storage_are_copied_separately() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    square = torch.arange(9.0).reshape(3, 3)
    source = {"base": base, "row": base[1], "t": base.t(), "square": square, "square_t": square.t()}
    staged = StateStager(available_memory=_plenty).stage({"m": source})["m"]
    for name, tensor in source.items():
        assert torch.equal(staged[name], tensor), name
    base.zero_()
    assert torch.equal(staged["row"], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    assert torch.equal(staged["t"], torch.arange(12.0).reshape(3, 4).t())
    assert staged["square_t"].data_ptr() != staged["square"].data_ptr()  # same shape, other strides: not a tie


def test_non_contiguous_sources_are_copied_correctly() -> None:
    base = torch.randn(6, 8)
    source = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.randn(1, 5).expand(4, 5),
        "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
        "offset": base[3:, 2:],
    }
    assert not any(t.is_contiguous() for t in source.values())
    staged = StateStager(available_memory=_plenty).stage({"m": source})["m"]
    for name, tensor in source.items():
        assert staged[name].shape == tensor.shape, name
        assert torch.equal(staged[name], tensor), name
        assert _bytes(staged[name]) == _bytes(tensor), name
        assert not _shares_memory(staged[name], tensor), name


def test_sparse_tensors_are_cloned() -> None:
    dense = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    sparse = dense.to_sparse().coalesce()
    stager = StateStager(available_memory=_plenty)
    staged = stager.stage({"m": {"sparse": sparse}})["m"]["sparse"]
    assert staged is not sparse and staged.is_sparse
    assert torch.equal(staged.to_dense(), dense)
    sparse.values().mul_(10)  # the source changes, the clone does not
    assert torch.equal(staged.to_dense(), dense)
    assert stager.nbytes == 0  # no host buffer of the stager's own


def test_quantized_tensors_are_cloned() -> None:
    with warnings.catch_warnings():  # quantized tensor creation is deprecated in recent torch
        warnings.simplefilter("ignore", UserWarning)
        try:
            quantized = torch.quantize_per_tensor(
                torch.tensor([0.5, 1.0, -1.0]), scale=0.5, zero_point=2, dtype=torch.quint8
            )
        except (AttributeError, RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"no quantized tensors in this torch: {exc}")
        before = quantized.int_repr().clone()
        staged = StateStager(available_memory=_plenty).stage({"m": {"q": quantized}})["m"]["q"]
        assert staged is not quantized and staged.is_quantized
        assert torch.equal(staged.int_repr(), before)
        assert staged.q_scale() == 0.5 and staged.q_zero_point() == 2
        assert not _shares_memory(staged, quantized)


# -- buffers ------------------------------------------------------------------


def test_buffers_are_reused_when_shapes_and_dtypes_match() -> None:
    stager = StateStager(available_memory=_plenty)
    first = stager.stage({"m": {"w": torch.zeros(4, 3), "b": torch.zeros(3, dtype=torch.float16)}})["m"]
    ptrs = {k: t.data_ptr() for k, t in first.items()}
    nbytes = stager.nbytes
    new_w, new_b = torch.randn(4, 3), torch.randn(3).half()
    second = stager.stage({"m": {"w": new_w, "b": new_b}})["m"]
    assert {k: t.data_ptr() for k, t in second.items()} == ptrs
    assert stager.nbytes == nbytes
    assert torch.equal(second["w"], new_w) and torch.equal(second["b"], new_b)


@pytest.mark.parametrize(
    "changed",
    [torch.zeros(5, 3), torch.zeros(3, 4), torch.zeros(4, 3, dtype=torch.float64)],
    ids=["more-rows", "same-numel-other-shape", "other-dtype"],
)
def test_a_buffer_is_reallocated_when_its_tensor_changes_shape_or_dtype(changed: torch.Tensor) -> None:
    stager = StateStager(available_memory=_plenty)
    keep = torch.randn(7)
    first = stager.stage({"m": {"w": torch.zeros(4, 3), "keep": keep}})["m"]
    old = weakref.ref(first["w"])
    keep_ptr = first["keep"].data_ptr()
    del first
    gc.collect()
    assert old() is not None  # still held by the stager
    changed.fill_(7)
    second = stager.stage({"m": {"w": changed, "keep": keep}})["m"]
    gc.collect()
    assert old() is None  # the old buffer was dropped ...
    assert second["w"].shape == changed.shape and second["w"].dtype == changed.dtype  # ... for a new one
    assert torch.equal(second["w"], changed)
    assert second["keep"].data_ptr() == keep_ptr
    assert stager.nbytes == changed.nbytes + keep.nbytes


def test_a_buffer_is_dropped_when_its_path_disappears() -> None:
    stager = StateStager(available_memory=_plenty)
    first = stager.stage({"m": {"a": torch.zeros(100), "gone": torch.zeros(1000)}, "x": [torch.zeros(10)]})
    gone = weakref.ref(first["m"]["gone"])
    dropped_part = weakref.ref(first["x"][0])
    del first
    second = stager.stage({"m": {"a": torch.ones(100)}})
    gc.collect()
    assert gone() is None and dropped_part() is None
    assert stager.nbytes == 100 * 4
    assert torch.equal(second["m"]["a"], torch.ones(100))


def test_nbytes_is_exactly_one_copy_of_the_state() -> None:
    model = _TiedModel()
    state = {
        "weights": model.state_dict(),
        "components": [{"exp_avg": torch.zeros(10, dtype=torch.float64), "step": torch.tensor(1)}, {"n": 3}],
    }
    stager = StateStager(available_memory=_plenty)
    assert stager.nbytes == 0
    stager.stage(state)
    distinct = sum(p.nbytes for p in model.parameters()) + 10 * 8 + 8
    assert stager.nbytes == distinct == state_nbytes(state)
    stager.stage(state)  # staging again holds no second copy
    assert stager.nbytes == distinct


def test_release_frees_the_buffers() -> None:
    stager = StateStager(available_memory=_plenty)
    staged = stager.stage({"m": {"w": torch.zeros(256)}})
    ref = weakref.ref(staged["m"]["w"])
    del staged
    gc.collect()
    assert ref() is not None and stager.nbytes == 256 * 4  # kept for the next save
    stager.release()
    gc.collect()
    assert ref() is None and stager.nbytes == 0
    again = stager.stage({"m": {"w": torch.ones(256)}})  # usable afterwards: allocates again
    assert torch.equal(again["m"]["w"], torch.ones(256)) and stager.nbytes == 256 * 4


# -- the host-memory check -------------------------------------------------------


def test_too_little_memory_raises_naming_the_checkpoint_and_the_sizes_and_allocates_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allocations: list[tuple[Any, ...]] = []
    real_empty = torch.empty

    def counting_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        allocations.append(args)
        return real_empty(*args, **kwargs)

    state = {"weights": {"w": torch.zeros(MiB, dtype=torch.float32)}, "components": [{"m": torch.zeros(MiB // 2)}]}
    stager = StateStager(available_memory=lambda: MiB)
    monkeypatch.setattr(torch, "empty", counting_empty)
    with pytest.raises(InsufficientMemoryError) as raised:
        stager.stage(state, what="'checkpoint-7'")
    monkeypatch.undo()
    message = str(raised.value)
    assert "'checkpoint-7'" in message
    assert "needs 6 MiB" in message and "only 1 MiB is available" in message
    assert isinstance(raised.value, MemoryError)
    assert allocations == [] and stager.nbytes == 0


def test_the_memory_check_counts_only_buffers_it_must_allocate() -> None:
    available = [2**40]
    stager = StateStager(available_memory=lambda: available[0])
    state = {"m": {"w": torch.zeros(MiB), "b": torch.zeros(1024)}}  # 4 MiB + 4 KiB
    stager.stage(state)
    available[0] = 1  # almost nothing left: every buffer already exists, nothing to allocate
    stager.stage(state)
    available[0] = 2 * MiB  # a new 1 MiB tensor fits, although the whole state (5 MiB) would not
    grown = {"m": {**state["m"], "new": torch.zeros(MiB // 4)}}
    stager.stage(grown)
    assert stager.nbytes == state_nbytes(grown)
    available[0] = MiB  # a reallocation (4 MiB -> 8 MiB) is counted
    with pytest.raises(InsufficientMemoryError, match="needs 8 MiB"):
        stager.stage({"m": {**grown["m"], "w": torch.zeros(2 * MiB)}})


def test_the_memory_check_honours_the_reserve() -> None:
    state = {"m": {"w": torch.zeros(MiB // 4)}}  # 1 MiB
    StateStager(available_memory=lambda: 3 * MiB, reserve=2 * MiB).stage(state)
    with pytest.raises(InsufficientMemoryError, match=r"needs 1 MiB .*\+ 3 MiB reserve.* only 3 MiB is available"):
        StateStager(available_memory=lambda: 3 * MiB, reserve=3 * MiB).stage(state)


def test_unknown_available_memory_skips_the_check() -> None:
    stager = StateStager(available_memory=lambda: None, reserve=2**50)
    staged = stager.stage({"m": {"w": torch.ones(8)}})
    assert torch.equal(staged["m"]["w"], torch.ones(8))


def test_available_host_memory_is_positive_and_at_most_total_ram() -> None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("needs Linux /proc/meminfo")
    total = next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:"))
    available = available_host_memory()
    assert isinstance(available, int)
    assert 0 < available <= total


def test_state_nbytes_counts_each_distinct_tensor_once() -> None:
    w = torch.zeros(10)  # 40 bytes
    state = {
        "a": {"w": w, "same": w, "view": w.view(10)},  # one tensor under three names
        "b": [w[:5], torch.zeros(3, dtype=torch.float64)],  # another view of w (20 bytes), 24 bytes
        "c": (1, "x", None),
    }
    assert state_nbytes(state) == 40 + 20 + 24
    assert state_nbytes({}) == 0


# -- keys that look alike, empty tensors ----------------------------------------------------


def test_keys_that_join_to_the_same_path_get_buffers_of_their_own() -> None:
    first, second = torch.zeros(3), torch.ones(3)
    staged = StateStager(available_memory=_plenty).stage({"c": {"a/b": first, "a": {"b": second}}})["c"]
    assert torch.equal(staged["a/b"], first)
    assert torch.equal(staged["a"]["b"], second)
    numbered = StateStager(available_memory=_plenty).stage({"c": {0: first, "0": second}})["c"]
    assert torch.equal(numbered[0], first) and torch.equal(numbered["0"], second)


def test_empty_tensors_can_be_staged() -> None:
    stager = StateStager(available_memory=_plenty)
    stager.stage({"m": {"w": torch.ones(2), "e": torch.ones(1)}})
    staged = stager.stage({"m": {"w": torch.ones(2), "e": torch.empty(0)}})  # a tensor that became empty
    assert staged["m"]["e"].shape == (0,)
    assert StateStager(available_memory=_plenty).stage({"m": {"e": torch.empty(0)}})["m"]["e"].shape == (0,)
    two = StateStager(available_memory=_plenty).stage({"m": {"a": torch.empty(0), "b": torch.empty(0, 3)}})["m"]
    assert two["a"] is not two["b"] and two["b"].shape == (0, 3)  # empty tensors are never taken for ties
