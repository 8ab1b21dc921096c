"""Ordering and safety: index last, stale files after it, bad input refused without damage."""

from __future__ import annotations

import io
import json
from typing import ClassVar

import pytest
import torch
from torch import nn

from ckptio.errors import CorruptCheckpointError, InvalidArgumentError
from ckptio.format import (
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    StateDictMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from ckptio.storage import (
    FaultInjectingStorage,
    SimulatedCrash,
    Storage,
    StorageWrapper,
    StreamWriter,
    open_storage,
)


class _LoggedWriter(StreamWriter):
    def __init__(self, inner: StreamWriter, key: str, log: list[tuple[str, str]]) -> None:
        super().__init__(inner.url)
        self._inner, self._key, self._log = inner, key, log

    def _write(self, data: memoryview) -> int:
        return self._inner.write(data)

    def _commit(self) -> None:
        self._inner.commit()
        self._log.append(("publish", self._key))

    def _abort(self) -> None:
        self._inner.abort()


class Recording(StorageWrapper):
    """Logs which objects are published, read and deleted, in order."""

    def __init__(self, inner: Storage, log: list[tuple[str, str]] | None = None) -> None:
        super().__init__(inner)
        self.log: list[tuple[str, str]] = [] if log is None else log

    def rewrap(self, inner: Storage) -> Recording:
        return Recording(inner, self.log)

    def write_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        super().write_bytes(key, data)
        self.log.append(("publish", key))

    def open_writer(self, key: str) -> StreamWriter:
        return _LoggedWriter(super().open_writer(key), key, self.log)

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self.log.append(("read", key))
        return super().read_bytes(key, start, end)

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:  # type: ignore[override]
        self.log.append(("read", key))
        return super().read_ranges(key, ranges)

    def delete(self, key: str, *, missing_ok: bool = True) -> None:
        self.log.append(("delete", key))
        super().delete(key, missing_ok=missing_ok)

    def local_path(self, key: str = "") -> str | None:
        return None  # every read goes through the log


def _snapshot(storage: Storage) -> dict[str, bytes]:
    return {key: storage.read_bytes(key) for key in storage.walk()}


def _sd(seed: int, n: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(8, 8, generator=gen) for i in range(n)}


def test_index_is_published_after_shards_and_stale_files_go_after_it(storage: Storage) -> None:
    save_checkpoint(storage, _sd(0), safetensors=True, max_shard_size=300)
    old_shards = [k for k in storage.list() if k.endswith(".safetensors")]
    assert len(old_shards) == 4
    recording = Recording(storage)
    save_checkpoint(recording, _sd(1), safetensors=True, max_shard_size=600)
    published = [k for op, k in recording.log if op == "publish"]
    assert sorted(published[:-1]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert published[-1] == SAFE_WEIGHTS_INDEX_NAME
    index_at = recording.log.index(("publish", SAFE_WEIGHTS_INDEX_NAME))
    deleted = [k for op, k in recording.log if op == "delete"]
    assert all(recording.log.index(("delete", k)) > index_at for k in deleted)
    assert sorted(deleted) == sorted(set(old_shards) - set(published))
    assert sorted(storage.list()) == sorted(published)


def test_resave_in_the_other_format_removes_only_old_weight_files(storage: Storage) -> None:
    save_checkpoint(storage, _sd(0), safetensors=False, max_shard_size=300)
    storage.write_bytes("optimizer_state.pt", b"keep me")
    storage.write_bytes("config.json", b"{}")
    storage.write_bytes(WEIGHTS_NAME, b"an old single-file save")
    save_checkpoint(storage, _sd(1), safetensors=True)
    assert sorted(storage.list()) == sorted(
        ["config.json", "optimizer_state.pt", "model-00001-of-00001.safetensors", SAFE_WEIGHTS_INDEX_NAME]
    )
    loaded = load_checkpoint(storage)
    assert loaded is not None and all(torch.equal(loaded[k], v) for k, v in _sd(1).items())


@pytest.mark.parametrize("new_format", [True, False], ids=["bin-to-safetensors", "safetensors-to-bin"])
def test_a_crash_at_any_point_leaves_a_complete_checkpoint(backend_url: object, new_format: bool) -> None:
    base = open_storage(backend_url.url, **backend_url.storage_options)  # type: ignore[attr-defined]
    old, new = _sd(0), _sd(1)
    outcomes = set()
    for ops in range(1, 40):
        target = base.child(f"crash{ops}")
        save_checkpoint(target, old, safetensors=not new_format, max_shard_size=300)
        try:
            save_checkpoint(
                FaultInjectingStorage(target, fail_after_ops=ops, crash=True),
                new,
                safetensors=new_format,
                max_shard_size=300,
            )
        except SimulatedCrash:
            pass
        else:
            break
        loaded = load_checkpoint(target)
        assert loaded is not None
        which = "old" if all(torch.equal(loaded[k], v) for k, v in old.items()) else "new"
        assert all(torch.equal(loaded[k], v) for k, v in (old if which == "old" else new).items())
        outcomes.add(which)
    else:
        pytest.fail("the save never completed within 40 operations")
    assert outcomes == {"old", "new"}  # crashes before and after the commit were both exercised


def test_strict_reports_missing_names_before_reading_any_shard(storage: Storage) -> None:
    save_checkpoint(storage, nn.Linear(3, 3), safetensors=True)
    model = nn.Sequential(nn.Linear(3, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recording = Recording(storage)
    with pytest.raises(StateDictMismatchError, match=r"missing '0.weight', '0.bias'; nothing was loaded") as caught:
        load_checkpoint(recording, model)
    assert "unexpected" not in str(caught.value)  # an index's extra tensors are not the module's concern
    assert {k for op, k in recording.log if op == "read"} == {SAFE_WEIGHTS_INDEX_NAME}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_non_strict_loads_what_matches(storage: Storage) -> None:
    source = nn.Linear(3, 3)
    save_checkpoint(storage, {"weight": source.weight.detach(), "extra": torch.ones(1)}, safetensors=True)
    target = nn.Linear(3, 3)
    with pytest.raises(StateDictMismatchError, match="missing 'bias'; nothing was loaded"):
        load_checkpoint(storage, target)
    load_checkpoint(storage, target, strict=False)
    assert torch.equal(target.weight, source.weight)


def test_a_single_weights_file_must_match_the_module_exactly(storage: Storage) -> None:
    # Only an index may describe more than the module; a lone weights file is the module's own.
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(3, 3), "bias": torch.ones(3), "extra": torch.ones(1)}, buffer)
    storage.write_bytes(WEIGHTS_NAME, buffer.getvalue())
    target = nn.Linear(3, 3)
    with pytest.raises(StateDictMismatchError, match="unexpected 'extra'"):
        load_checkpoint(storage, target)
    assert not torch.equal(target.weight, torch.ones(3, 3))


class HFStyle(nn.Module):
    """A module declaring its tied alias the way transformers 5 does."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"head.weight": "emb.weight"}

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 2)
        self.head = nn.Linear(2, 5, bias=False)
        if tie:
            self.head.weight = self.emb.weight


@pytest.mark.parametrize("tie", [True, False], ids=["tied-module", "declared-only"])
def test_alias_dropped_by_a_hugging_face_checkpoint_is_not_missing(storage: Storage, tie: bool) -> None:
    source = HFStyle(tie=True)
    hf_state = {"emb.weight": source.emb.weight.detach()}  # what save_pretrained writes
    save_checkpoint(storage, hf_state, safetensors=True)
    target = HFStyle(tie=tie)
    load_checkpoint(storage, target, strict=True)
    assert target.head.weight is target.emb.weight
    assert torch.equal(target.head.weight, source.emb.weight)


@pytest.mark.parametrize(
    ("index_bytes", "match"),
    [
        (b"{not json", "cannot parse index"),
        (json.dumps({"metadata": {}, "weight_map": {"w": "../../etc/passwd"}}).encode(), "outside the checkpoint"),
        (json.dumps({"metadata": {}, "weight_map": {"w": "s3://other/x.safetensors"}}).encode(), "outside"),
        (json.dumps({"metadata": {"param_sharing": "w"}, "weight_map": {}}).encode(), "param_sharing"),
    ],
    ids=["malformed-json", "parent-dir", "url", "bad-sharing"],
)
def test_bad_index_is_refused_and_nothing_changes(storage: Storage, index_bytes: bytes, match: str) -> None:
    save_checkpoint(storage, _sd(0), safetensors=True, max_shard_size=300)
    storage.write_bytes(SAFE_WEIGHTS_INDEX_NAME, index_bytes)
    before = _snapshot(storage)
    with pytest.raises(CorruptCheckpointError, match=match):
        load_checkpoint(storage)
    assert _snapshot(storage) == before


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_truncated_shard_is_refused_naming_it(storage: Storage, safetensors: bool) -> None:
    save_checkpoint(storage, _sd(0), safetensors=safetensors, max_shard_size=300)
    shard = min(k for k in storage.list() if "00002" in k)
    data = storage.read_bytes(shard)
    storage.write_bytes(shard, data[: len(data) // 2])
    before = _snapshot(storage)
    with pytest.raises(CorruptCheckpointError, match=shard) as info:
        load_checkpoint(storage)
    if safetensors:
        assert f"object has {len(data) // 2}" in str(info.value)
    assert _snapshot(storage) == before


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused_naming_the_file(storage: Storage) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2), "x": Evil()}, buffer)
    storage.write_bytes(WEIGHTS_NAME, buffer.getvalue())
    with pytest.raises(CorruptCheckpointError, match=f"refusing to load .*{WEIGHTS_NAME}.*weights_only"):
        load_checkpoint(storage)
    assert storage.read_bytes(WEIGHTS_NAME) == buffer.getvalue()


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_wrong_shapes_are_refused(storage: Storage, safetensors: bool) -> None:
    save_checkpoint(storage, nn.Linear(4, 3), safetensors=safetensors)
    target = nn.Linear(3, 4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match=r"'weight': checkpoint shape \[3, 4\], module \[4, 3\]"):
        load_checkpoint(storage, target)
    if safetensors:  # headers are checked before any data is read
        assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_float_weights_into_integer_buffers_are_refused(storage: Storage) -> None:
    save_checkpoint(storage, {"counts": torch.rand(3)}, safetensors=True)
    target = nn.Module()
    target.register_buffer("counts", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(StateDictMismatchError, match="dtype torch.float32, module torch.int64"):
        load_checkpoint(storage, target)


def test_missing_shard_is_file_not_found(storage: Storage) -> None:
    save_checkpoint(storage, _sd(0), safetensors=True, max_shard_size=300)
    storage.delete("model-00003-of-00004.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00003-of-00004.safetensors"):
        load_checkpoint(storage)


def test_nothing_to_load_is_file_not_found(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError, match="no index"):
        load_checkpoint(storage)


@pytest.mark.parametrize(
    "bad",
    [{"ok": torch.ones(2), "meta": torch.empty(2, device="meta")}, {"ok": torch.ones(2), "list": [1]}],
    ids=["meta-tensor", "not-a-tensor"],
)
def test_bad_input_to_save_changes_nothing(storage: Storage, bad: dict[str, object]) -> None:
    save_checkpoint(storage, _sd(0), safetensors=True, max_shard_size=300)
    before = _snapshot(storage)
    with pytest.raises(InvalidArgumentError):
        save_checkpoint(storage, bad, safetensors=True, max_shard_size=1)  # type: ignore[arg-type]
    assert _snapshot(storage) == before


def test_bin_index_loads_with_weights_only(storage: Storage) -> None:
    save_checkpoint(storage, _sd(0), safetensors=False, max_shard_size=300)
    assert json.loads(storage.read_bytes(WEIGHTS_INDEX_NAME))["weight_map"]["layer3.weight"] == (
        "pytorch_model-00004-of-00004.bin"
    )
    loaded = load_checkpoint(storage, keys=["layer3.weight"])
    assert loaded is not None and torch.equal(loaded["layer3.weight"], _sd(0)["layer3.weight"])
