"""A corpus of hostile checkpoints, generated (never stored): valid ones, each corrupted one way.

:func:`build_run` saves two small checkpoints with :class:`ckptio.CheckpointManager`
(two safetensors or ``.bin`` weight shards, an index, an optimizer component, the
manifest); a :class:`Case` then damages ``checkpoint-2`` in one specific way. Most
cases *reseal* the manifest afterwards (sizes and CRC32C of the damaged files
recomputed), so that the damage reaches the parser itself instead of being caught
by the size check.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ckptio import CheckpointConfig, CheckpointManager, SharingPattern, StateComponent
from ckptio.checkpoint.manifest import CheckpointManifest, read_manifest, write_manifest
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord, checksum_bytes

CKPT = "checkpoints/checkpoint-2"
SIBLING = "checkpoints/checkpoint-1"
MANIFEST = "checkpoint_manifest.json"
OPTIMIZER = "optimizer_state.pt"
ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
#: The value every tensor of the files planted outside a checkpoint holds.
OUTSIDE_VALUE = 777.0


def tiny_model(seed: int) -> nn.Module:
    """Two linear layers, 120 bytes of float32 weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


class _Provider:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def get_state_components(self) -> list[StateComponent]:
        return [StateComponent("optimizer", self.optimizer, SharingPattern.GLOBAL)]

    def get_process_groups(self) -> dict[str, Any]:
        return {}


def make_manager(url: str, options: dict[str, Any], model: nn.Module, **config: Any) -> CheckpointManager:
    """A manager over ``url`` for ``model`` and an SGD optimizer with momentum."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = CheckpointConfig(output_dir=url, storage_options=options, max_shard_size=96, **config)
    return CheckpointManager(cfg, _Provider(optimizer), model=model)


def build_run(url: str, options: dict[str, Any], *, safetensors: bool) -> None:
    """Save ``checkpoint-1`` and ``checkpoint-2`` (different weights) under ``url``."""
    model = tiny_model(0)
    manager = make_manager(url, options, model, save_safetensors=safetensors)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        manager.provider.optimizer.step()  # type: ignore[union-attr]
        manager.save_checkpoint()


@dataclass
class Context:
    """What a corruption works on: the checkpoint, and local scratch space outside every checkpoint."""

    ckpt: Storage
    outside: str  # a local directory outside the storage
    sentinel: str  # the file a payload that runs would create

    def shards(self) -> list[str]:
        """The weight shard files, sorted."""
        return sorted(k for k in self.ckpt.list() if k.endswith((".safetensors", ".bin")))


# -- building blocks ----------------------------------------------------------------------------


def reseal(ckpt: Storage, extra: tuple[str, ...] = ()) -> None:
    """Rewrite the manifest so every listed file (and ``extra``) has its current size and CRC32C."""
    manifest = read_manifest(ckpt)
    assert manifest is not None
    paths = [r.path for r in manifest.files] + [p for p in extra if p not in {r.path for r in manifest.files}]
    records = []
    for path in paths:
        if ckpt.exists(path):
            data = ckpt.read_bytes(path)
            records.append(FileRecord(path, len(data), checksum_bytes(data)))
    fields = manifest.to_json() | {"files": [r.to_json() for r in records]}
    write_manifest(ckpt, CheckpointManifest.from_json(fields))


def split_shard(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (as a dict) and its data section."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_shard(header: bytes | dict[str, Any], body: bytes) -> bytes:
    """A safetensors file from a header (dict or raw bytes) and a data section."""
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def first_shard(ctx: Context) -> str:
    return ctx.shards()[0]


def tensor_names(header: dict[str, Any]) -> list[str]:
    """Tensor names of a header, in data order."""
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])


def edit_header(edit: Callable[[dict[str, Any], bytes], tuple[bytes | dict[str, Any], bytes]]) -> Callable[[Context], str]:
    """A corruption that rewrites the first shard's header (and maybe its data) with ``edit``; resealed."""

    def corrupt(ctx: Context) -> str:
        key = first_shard(ctx)
        header, body = split_shard(ctx.ckpt.read_bytes(key))
        new_header, new_body = edit(header, body)
        ctx.ckpt.write_bytes(key, join_shard(new_header, new_body))
        reseal(ctx.ckpt)
        return key

    return corrupt


def set_entry(field_name: str, value: Any, which: int = 0) -> Callable[[Context], str]:
    """Set ``field_name`` of the ``which``-th tensor (data order) of the first shard to ``value``."""

    def edit(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        header[tensor_names(header)[which]][field_name] = value
        return header, body

    return edit_header(edit)


def raw_file(
    key_of: Callable[[Context], str], data: bytes | Callable[[Context, bytes], bytes], *, sealed: bool = True
) -> Callable[[Context], str]:
    """A corruption that replaces one file with ``data`` (or ``data(ctx, old bytes)``); resealed if ``sealed``."""

    def corrupt(ctx: Context) -> str:
        key = key_of(ctx)
        old = ctx.ckpt.read_bytes(key)
        ctx.ckpt.write_bytes(key, data(ctx, old) if callable(data) else data)
        if sealed and key != MANIFEST:
            reseal(ctx.ckpt)
        return key

    return corrupt


def _index_key(ctx: Context) -> str:
    return ST_INDEX if ctx.ckpt.exists(ST_INDEX) else BIN_INDEX


def edit_index(edit: Callable[[Context, dict[str, Any]], Any]) -> Callable[[Context], str]:
    """A corruption that rewrites the index JSON with ``edit(ctx, index)`` (returns the new JSON value)."""

    def data(ctx: Context, old: bytes) -> bytes:
        return json.dumps(edit(ctx, json.loads(old))).encode()

    return raw_file(_index_key, data)


def redirect_first(target: str | Callable[[Context], str]) -> Callable[[Context], str]:
    """An index whose first tensor's shard is ``target``."""

    def edit(ctx: Context, index: dict[str, Any]) -> dict[str, Any]:
        first = sorted(index["weight_map"])[0]
        index["weight_map"][first] = target(ctx) if callable(target) else target
        return index

    return edit_index(edit)


def edit_manifest(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Context], str]:
    """A corruption that rewrites the manifest JSON with ``edit`` (no reseal: the manifest is the target)."""
    return raw_file(lambda ctx: MANIFEST, lambda ctx, old: json.dumps(edit(json.loads(old))).encode())


def edit_record(field_name: str, value: Callable[[Any], Any], path: str = OPTIMIZER) -> Callable[[Context], str]:
    """Change one field of the manifest's file record of ``path``."""

    def edit(manifest: dict[str, Any]) -> dict[str, Any]:
        record = next(r for r in manifest["files"] if r["path"] == path)
        record[field_name] = value(record[field_name])
        return manifest

    return edit_manifest(edit)


def with_field(name: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda manifest: manifest | {name: value}


def without_field(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda manifest: {k: v for k, v in manifest.items() if k != name}


# -- pickles that would run code --------------------------------------------------------------


class _RunsCode:
    """Pickles as a call of ``func(*args)``: unpickling it without weights_only runs that call."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _touch_code(ctx: Context) -> str:
    return f"open({ctx.sentinel!r}, 'w').write('pwned')"


def torch_payload(wrap: Callable[[Any], Any], *, via_system: bool = False) -> Callable[[Context, bytes], bytes]:
    """A ``torch.save`` zip whose pickle holds ``wrap(payload)``."""

    def data(ctx: Context, old: bytes) -> bytes:
        payload = _RunsCode(os.system, f"touch {ctx.sentinel}") if via_system else _RunsCode(exec, _touch_code(ctx))
        path = os.path.join(ctx.outside, "payload.pt")
        torch.save(wrap(payload), path)
        with open(path, "rb") as f:
            return f.read()

    return data


def raw_pickle(ctx: Context, old: bytes) -> bytes:
    """A bare (legacy, non-zip) pickle calling ``os.system``."""
    return pickle.dumps({"weight": _RunsCode(os.system, f"touch {ctx.sentinel}")}, protocol=2)


# -- symbolic links (local only) --------------------------------------------------------------


def link_outside(key_of: Callable[[Context], str], make: Callable[[Context, str], None]) -> Callable[[Context], str]:
    """Replace a file by a symlink to a recognisable file ``make`` writes outside; reseal to match it."""

    def corrupt(ctx: Context) -> str:
        key = key_of(ctx)
        path = ctx.ckpt.local_path(key)
        assert path is not None
        planted = os.path.join(ctx.outside, "planted-" + key)
        make(ctx, planted)
        with open(planted, "rb") as f:
            data = f.read()
        manifest = read_manifest(ctx.ckpt)
        assert manifest is not None
        if key != MANIFEST:
            records = [FileRecord(key, len(data), checksum_bytes(data)) if r.path == key else r for r in manifest.files]
            write_manifest(ctx.ckpt, CheckpointManifest.from_json(manifest.to_json() | {"files": [r.to_json() for r in records]}))
        os.unlink(path)
        os.symlink(planted, path)
        return key

    return corrupt


def planted_weights(ctx: Context, path: str) -> None:
    """A valid safetensors shard with the first shard's tensor names, every value OUTSIDE_VALUE."""
    header, body = split_shard(ctx.ckpt.read_bytes(first_shard(ctx)))
    values = torch.full((len(body) // 4,), OUTSIDE_VALUE, dtype=torch.float32)
    with open(path, "wb") as f:
        f.write(join_shard(header, values.numpy().tobytes()))


def planted_optimizer(ctx: Context, path: str) -> None:
    """A valid optimizer state whose learning rate is OUTSIDE_VALUE."""
    state = torch.load(io.BytesIO(ctx.ckpt.read_bytes(OPTIMIZER)), weights_only=True)
    for group in state["param_groups"]:
        group["lr"] = OUTSIDE_VALUE
    torch.save(state, path)


def planted_manifest(ctx: Context, path: str) -> None:
    """A copy of the manifest (valid, outside the checkpoint)."""
    with open(path, "wb") as f:
        f.write(ctx.ckpt.read_bytes(MANIFEST))


# -- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile checkpoint.

    Attributes:
        name: the test id.
        category: safetensors, index, manifest, pickle or symlink.
        corrupt: damages the checkpoint; returns the key the error must name.
        problem: regex the error message must match (besides the file's URL).
        checks: entry points that must refuse it: ``load`` (CheckpointManager),
            ``weights`` (ckptio.load_checkpoint), ``inspect`` (the CLI command),
            ``verify`` (verify_checkpoint reports it; a verifying load refuses it).
        safetensors: weights format of the run.
        local_only: needs a local filesystem (symbolic links).
        names: the key the error must name, when not the damaged file (a missing one).
    """

    name: str
    category: str
    corrupt: Callable[[Context], str]
    problem: str
    checks: tuple[str, ...] = ("load", "weights", "inspect")
    safetensors: bool = True
    local_only: bool = False
    names: str | None = None


def _shift_second(delta: int, trim: int) -> Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes]]:
    """Move every tensor after the first by ``delta`` bytes; drop ``trim`` bytes of data (negative: add)."""

    def edit(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        for name in tensor_names(header)[1:]:
            header[name]["data_offsets"] = [o + delta for o in header[name]["data_offsets"]]
        return header, body[: len(body) - trim] if trim >= 0 else body + b"\0" * -trim

    return edit


def _grow_last(header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
    """The last tensor twice as long, its data running past the end of the file."""
    entry = header[tensor_names(header)[-1]]
    begin, end = entry["data_offsets"]
    entry["shape"] = [entry["shape"][0] * 2, *entry["shape"][1:]]
    entry["data_offsets"] = [begin, end + (end - begin)]
    return header, body


def _duplicate_tensor(header: dict[str, Any], body: bytes) -> tuple[bytes, bytes]:
    """The header text with its first tensor's entry given twice (the second pointing elsewhere)."""
    names = tensor_names(header)
    second = header[names[1]]
    decoy = json.dumps({"dtype": second["dtype"], "shape": second["shape"], "data_offsets": second["data_offsets"]})
    return (json.dumps(header)[:-1] + f", {json.dumps(names[0])}: {decoy}}}").encode(), body


def _duplicate_index_key(ctx: Context, old: bytes) -> bytes:
    index = json.loads(old)
    first = sorted(index["weight_map"])[0]
    others = [f for f in set(index["weight_map"].values()) if f != index["weight_map"][first]]
    text = json.dumps(index)
    return text.replace('"weight_map": {', f'"weight_map": {{{json.dumps(first)}: {json.dumps(others[0])}, ', 1).encode()


def _flip_data_byte(ctx: Context, old: bytes) -> bytes:
    data = bytearray(old)
    data[-3] ^= 0x40
    return bytes(data)


SHARD = first_shard
CASES: list[Case] = [
    # safetensors headers
    Case("st-header-length-huge", "safetensors", raw_file(SHARD, lambda c, b: struct.pack("<Q", 2**40) + b[8:]), "header length"),
    Case("st-header-length-past-eof", "safetensors", raw_file(SHARD, lambda c, b: struct.pack("<Q", 50_000_000) + b[8:]), "truncated"),
    Case("st-header-not-json", "safetensors", edit_header(lambda h, b: (b"{not json at all", b)), "not valid JSON"),
    Case("st-header-not-utf8", "safetensors", edit_header(lambda h, b: (b"\xff\xfe\xfd{}", b)), "not valid JSON"),
    Case("st-header-a-list", "safetensors", edit_header(lambda h, b: (b"[1, 2, 3]", b)), "not a JSON object"),
    Case("st-header-deep-nesting", "safetensors", edit_header(lambda h, b: (b"[" * 100_000, b)), "nested too deeply"),
    Case("st-header-huge-integer", "safetensors", edit_header(lambda h, b: ((json.dumps(h)[:-1] + ', "x": ' + "9" * 5000 + "}").encode(), b)), "not valid JSON"),
    Case("st-entry-not-object", "safetensors", edit_header(lambda h, b: ({**h, tensor_names(h)[0]: [1, 2]}, b)), "is not an object"),
    Case("st-metadata-not-object", "safetensors", edit_header(lambda h, b: ({**h, "__metadata__": [1]}, b)), "__metadata__"),
    Case("st-offsets-overlap", "safetensors", edit_header(_shift_second(-8, 8)), "overlaps"),
    Case("st-offsets-hole", "safetensors", edit_header(_shift_second(8, -8)), "hole"),
    Case("st-offsets-past-end", "safetensors", edit_header(_grow_last), "truncated"),
    Case("st-trailing-bytes", "safetensors", edit_header(lambda h, b: (h, b + b"\0" * 16)), "trailing bytes"),
    Case("st-offsets-negative", "safetensors", set_entry("data_offsets", [-16, 48]), "invalid data_offsets"),
    Case("st-offsets-float", "safetensors", set_entry("data_offsets", [0.0, 64.0]), "invalid data_offsets"),
    Case("st-offsets-reversed", "safetensors", set_entry("data_offsets", [64, 0]), "invalid data_offsets"),
    Case("st-offsets-three", "safetensors", set_entry("data_offsets", [0, 32, 64]), "invalid data_offsets"),
    Case("st-offsets-bool", "safetensors", set_entry("data_offsets", [False, True]), "invalid data_offsets"),
    Case("st-shape-negative", "safetensors", set_entry("shape", [-4, -4]), "invalid shape"),
    Case("st-shape-float", "safetensors", set_entry("shape", [4.0, 4]), "invalid shape"),
    Case("st-shape-bool", "safetensors", set_entry("shape", [True, 16]), "invalid shape"),
    Case("st-shape-huge", "safetensors", set_entry("shape", [2**62, 2**62]), "needs .* bytes"),
    Case("st-dtype-byte-count", "safetensors", set_entry("dtype", "F16"), "needs .* bytes"),
    Case("st-shape-byte-count", "safetensors", set_entry("shape", [4, 5]), "needs .* bytes"),
    Case("st-dtype-unknown", "safetensors", set_entry("dtype", "F128"), "unsupported dtype"),
    Case("st-dtype-not-string", "safetensors", set_entry("dtype", ["F32"]), "unsupported dtype"),
    Case("st-dtype-wrong-kind", "safetensors", set_entry("dtype", "I32"), "checkpoint dtype torch.int32", ("load", "weights")),
    Case("st-shape-reshaped", "safetensors", set_entry("shape", [2, 8]), r"checkpoint shape \[2, 8\]", ("load", "weights")),
    Case("st-duplicate-tensor", "safetensors", edit_header(_duplicate_tensor), "more than once"),
    Case("st-truncated", "safetensors", raw_file(SHARD, lambda c, b: b[: len(b) - 20]), "truncated"),
    Case("st-truncated-in-header", "safetensors", raw_file(SHARD, lambda c, b: b[:20]), "truncated"),
    Case("st-empty", "safetensors", raw_file(SHARD, b""), "truncated"),
    # the shard index
    Case("index-dotdot-sibling", "index", redirect_first(lambda c: "../checkpoint-1/" + first_shard(c)), "outside the checkpoint"),
    Case("index-dotdot-outside", "index", redirect_first("../../../outside/evil.safetensors"), "outside the checkpoint"),
    Case("index-absolute", "index", redirect_first(lambda c: os.path.join(c.outside, "evil.safetensors")), "outside the checkpoint"),
    Case("index-s3-url", "index", redirect_first("s3://other-bucket/evil.safetensors"), "outside the checkpoint"),
    Case("index-file-url", "index", redirect_first("file:///etc/passwd"), "outside the checkpoint"),
    Case("index-http-url", "index", redirect_first("http://127.0.0.1:9/evil.safetensors"), "outside the checkpoint"),
    Case("index-windows-path", "index", redirect_first("C:\\evil.safetensors"), "outside the checkpoint"),
    Case("index-missing-shard", "index", redirect_first("model-00009-of-00009.safetensors"), "does not exist|no such", names="model-00009-of-00009.safetensors"),
    Case("index-wrong-shard", "index", redirect_first(lambda c: c.shards()[1]), "does not hold", ("load", "weights"), names="model-00002-of-00002.safetensors"),
    Case("index-key-in-two-files", "index", raw_file(_index_key, _duplicate_index_key), "more than once"),
    Case("index-not-json", "index", raw_file(_index_key, b"{\"weight_map\": "), "cannot parse index"),
    Case("index-not-object", "index", edit_index(lambda c, i: [i]), "not a JSON object"),
    Case("index-weight-map-list", "index", edit_index(lambda c, i: {"weight_map": list(i["weight_map"].items())}), "no 'weight_map' object"),
    Case("index-shard-not-string", "index", edit_index(lambda c, i: {"weight_map": dict.fromkeys(i["weight_map"], 5)}), "not a file name"),
    Case("index-metadata-list", "index", edit_index(lambda c, i: i | {"metadata": [1]}), "'metadata' that is not an object"),
    # the manifest
    Case("manifest-wrong-size", "manifest", edit_record("size", lambda s: s + 1), "wrong size", ("load", "verify"), names=OPTIMIZER),
    Case("manifest-wrong-checksum", "manifest", edit_record("crc32c", lambda c: f"{int(c, 16) ^ 1:08x}"), "CRC32C", ("verify",), names=OPTIMIZER),
    Case("manifest-bitflip-in-shard", "manifest", raw_file(SHARD, _flip_data_byte, sealed=False), "CRC32C", ("verify",)),
    Case("manifest-lists-missing-file", "manifest", edit_manifest(lambda m: m | {"files": [*m["files"], {"path": "extra.pt", "size": 3, "crc32c": "00000000"}]}), "missing", ("load", "verify"), names="extra.pt"),
    Case("manifest-future-version", "manifest", edit_manifest(with_field("format_version", 99)), "newer than", ("load", "verify")),
    Case("manifest-version-string", "manifest", edit_manifest(with_field("format_version", "1")), "format_version", ("load", "verify")),
    Case("manifest-path-dotdot", "manifest", edit_record("path", lambda p: "../checkpoint-1/" + p), "not a relative path inside", ("load", "verify")),
    Case("manifest-path-absolute", "manifest", edit_record("path", lambda p: "/etc/passwd"), "not a relative path inside", ("load", "verify")),
    Case("manifest-path-url", "manifest", edit_record("path", lambda p: "s3://other-bucket/" + p), "not a relative path inside", ("load", "verify")),
    Case("manifest-component-file-outside", "manifest", edit_manifest(lambda m: m | {"components": {"optimizer": m["components"]["optimizer"] | {"files": ["../../x.pt"]}}}), "not a relative path inside", ("load", "verify")),
    Case("manifest-not-json", "manifest", raw_file(lambda c: MANIFEST, b"{\"format_version\": 1,"), "cannot read manifest", ("load", "verify")),
    Case("manifest-not-object", "manifest", edit_manifest(lambda m: [m]), "must be an object", ("load", "verify")),
    Case("manifest-missing-timestamp", "manifest", edit_manifest(without_field("timestamp")), "missing", ("load", "verify")),
    Case("manifest-record-missing-crc", "manifest", edit_manifest(lambda m: m | {"files": [{k: v for k, v in r.items() if k != "crc32c"} for r in m["files"]]}), "lacks", ("load", "verify")),
    Case("manifest-files-not-list", "manifest", edit_manifest(with_field("files", {"a": 1})), "'files' a list", ("load", "verify")),
    Case("manifest-duplicate-key", "manifest", raw_file(lambda c: MANIFEST, lambda c, b: b.replace(b"{", b'{"files": [], ', 1)), "more than once", ("load", "verify")),
    Case("manifest-nan", "manifest", raw_file(lambda c: MANIFEST, lambda c, b: b.replace(b'"world_size": 1', b'"world_size": NaN', 1)), "non-finite", ("load", "verify")),
    Case("manifest-deep-nesting", "manifest", raw_file(lambda c: MANIFEST, lambda c, b: b.replace(b'"metadata": {}', b'"metadata": ' + b"[" * 100_000, 1)), "nested too deeply", ("load", "verify")),
    # pickles that would run code
    Case("pickle-bin-exec", "pickle", raw_file(SHARD, torch_payload(lambda p: {"0.weight": p})), "weights_only", ("load", "weights"), safetensors=False),
    Case("pickle-bin-os-system", "pickle", raw_file(SHARD, torch_payload(lambda p: {"0.weight": p}, via_system=True)), "weights_only", ("load", "weights"), safetensors=False),
    Case("pickle-bin-legacy-format", "pickle", raw_file(SHARD, raw_pickle), "weights_only|not a readable", ("load", "weights"), safetensors=False),
    Case("pickle-pt-exec", "pickle", raw_file(lambda c: OPTIMIZER, torch_payload(lambda p: p)), "weights_only", ("load",)),
    Case("pickle-pt-nested", "pickle", raw_file(lambda c: OPTIMIZER, torch_payload(lambda p: {"state": {}, "param_groups": [{"lr": p}]}, via_system=True)), "weights_only", ("load",)),
    Case("pickle-pt-legacy-format", "pickle", raw_file(lambda c: OPTIMIZER, raw_pickle), "weights_only|not a readable", ("load",)),
    # symbolic links leading outside the checkpoint (local disk only)
    Case("symlink-shard", "symlink", link_outside(SHARD, planted_weights), "symbolic link", ("load", "weights", "inspect", "verify"), local_only=True),
    Case("symlink-component", "symlink", link_outside(lambda c: OPTIMIZER, planted_optimizer), "symbolic link", ("load", "verify"), local_only=True),
    Case("symlink-manifest", "symlink", link_outside(lambda c: MANIFEST, planted_manifest), "symbolic link", ("load", "verify"), local_only=True),
]
