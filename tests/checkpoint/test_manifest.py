"""The manifest: schema, JSON round trip, validation of what is read."""

from __future__ import annotations

import datetime as dt
import enum
import json
import re

import pytest
import torch

from ckptio._version import __version__
from ckptio.checkpoint import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointManifest,
    ComponentManifest,
    parse_timestamp,
    read_manifest,
    utc_timestamp,
    write_manifest,
)
from ckptio.errors import CorruptCheckpointError, InvalidArgumentError
from ckptio.storage import Storage
from ckptio.storage.integrity import FileRecord


def _manifest() -> CheckpointManifest:
    return CheckpointManifest(
        checkpoint_path="checkpoints/checkpoint-7",
        world_size=2,
        timestamp="2024-05-01T12:00:00.123456+00:00",
        components=[
            ComponentManifest("optimizer", "global", [0], size_bytes=10, files=["optimizer_state.pt"]),
            ComponentManifest(
                "rng",
                "per_rank",
                [0, 1],
                metadata={"note": "x"},
                files=["rng_state_rank_0.pt", "rng_state_rank_1.pt"],
            ),
            ComponentManifest("ema", "replicated", [0], replicated_across=[0, 1], checksum="0badcafe"),
            ComponentManifest("sampler", "per_group", [0], group_name="dp"),
        ],
        format_version=FORMAT_VERSION,
        checkpoint_id=7,
        library_version=__version__,
        torch_version=torch.__version__,
        best_checkpoints=[{"name": "checkpoint-5", "metric": "loss", "value": 0.5}],
        files=[
            FileRecord("model.safetensors", 100, "0123abcd"),
            FileRecord("optimizer_state.pt", 10, "deadbeef"),
            FileRecord("sub/dir/file.bin", 0, "00000000"),
        ],
        metadata={"step": 7},
    )


def _raw() -> dict:
    return _manifest().to_json()


def test_json_round_trip_is_exact() -> None:
    manifest = _manifest()
    text = manifest.to_bytes()
    assert CheckpointManifest.from_json(text) == manifest
    assert CheckpointManifest.from_json(json.loads(text)) == manifest
    assert json.loads(text)["files"][0] == {"path": "model.safetensors", "size": 100, "crc32c": "0123abcd"}


def test_defaults_record_versions() -> None:
    manifest = CheckpointManifest(checkpoint_path=".", world_size=1, timestamp=utc_timestamp())
    assert (manifest.format_version, manifest.library_version, manifest.torch_version) == (
        FORMAT_VERSION,
        __version__,
        torch.__version__,
    )
    assert (manifest.components, manifest.files, manifest.best_checkpoints, manifest.metadata) == ({}, [], [], {})


def test_write_then_read_on_storage(storage: Storage) -> None:
    assert read_manifest(storage) is None
    manifest = _manifest()
    write_manifest(storage, manifest)
    assert storage.walk() == [MANIFEST_NAME]
    assert read_manifest(storage) == manifest


def test_utc_timestamp_has_microseconds_and_utc() -> None:
    stamp = utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", stamp), stamp
    parsed = parse_timestamp(stamp)
    assert parsed.tzinfo == dt.timezone.utc
    assert abs((dt.datetime.now(dt.timezone.utc) - parsed).total_seconds()) < 60


def test_parse_timestamp_normalises_to_utc() -> None:
    expected = dt.datetime(2024, 1, 1, 10, 0, tzinfo=dt.timezone.utc)
    assert parse_timestamp("2024-01-01T12:00:00+02:00") == expected
    assert parse_timestamp("2024-01-01T10:00:00Z") == expected
    assert parse_timestamp("2024-01-01T10:00:00") == expected  # naive: taken as UTC


def test_component_accepts_the_sharing_pattern_enum() -> None:
    class Pattern(enum.Enum):
        PER_NODE = "per_node"

    component = ComponentManifest("data", Pattern.PER_NODE, [0, 4])  # type: ignore[arg-type]
    assert component.sharing_pattern == "per_node"
    assert component.to_json()["sharing_pattern"] == "per_node"


def _set(path: tuple, value: object) -> dict:
    raw = _raw()
    target = raw
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return raw


_DELETE = object()

_MALFORMED = {
    "missing world_size": (("world_size",), _DELETE),
    "world_size is a string": (("world_size",), "2"),
    "world_size is zero": (("world_size",), 0),
    "world_size is a bool": (("world_size",), True),
    "future format_version": (("format_version",), FORMAT_VERSION + 1),
    "timestamp not ISO": (("timestamp",), "yesterday"),
    "absolute checkpoint_path": (("checkpoint_path",), "/abs/checkpoints/checkpoint-7"),
    "URL checkpoint_path": (("checkpoint_path",), "s3://bucket/run/checkpoints/checkpoint-7"),
    "file path with ..": (("files", 0, "path"), "../other/model.safetensors"),
    "absolute file path": (("files", 0, "path"), "/etc/passwd"),
    "URL file path": (("files", 0, "path"), "s3://bucket/model.safetensors"),
    "backslash file path": (("files", 0, "path"), "..\\model.safetensors"),
    "size is a string": (("files", 0, "size"), "100"),
    "negative size": (("files", 0, "size"), -1),
    "bad crc": (("files", 0, "crc32c"), "xyz"),
    "file record not an object": (("files", 0), "model.safetensors"),
    "files not a list": (("files",), {"model.safetensors": 100}),
    "components neither object nor list": (("components",), "optimizer"),
    "component entry not an object": (("components", "optimizer"), ["global"]),
    "unknown sharing pattern": (("components", "optimizer", "sharing_pattern"), "everywhere"),
    "ranks not ints": (("components", "optimizer", "ranks"), ["0"]),
    "component file escapes": (("components", "optimizer", "files"), ["../x.pt"]),
    "metadata not an object": (("metadata",), [1]),
    "checkpoint_id is a float": (("checkpoint_id",), 7.5),
}


_URL = "s3://bucket/run/checkpoints/checkpoint-7/checkpoint_manifest.json"


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_manifest_is_corrupt_and_names_the_url(case: str) -> None:
    path, value = _MALFORMED[case]
    with pytest.raises(CorruptCheckpointError, match=re.escape(_URL)):
        CheckpointManifest.from_json(json.dumps(_set(path, value)).encode(), url=_URL)


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[]",
        b"\xff\xfe",
        b'{"world_size": NaN}',
        json.dumps({**_raw(), "world_size": float("inf")}).encode(),
    ],
    ids=["syntax", "array", "not-utf8", "nan", "infinity"],
)
def test_unparseable_manifest_is_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match=re.escape(_URL)):
        CheckpointManifest.from_json(raw, url=_URL)


def test_reading_a_malformed_manifest_names_its_url_and_changes_nothing(storage: Storage) -> None:
    raw = json.dumps(_set(("files", 0, "path"), "../escape")).encode()
    storage.write_bytes(MANIFEST_NAME, raw)
    with pytest.raises(CorruptCheckpointError, match=re.escape(storage.url_of(MANIFEST_NAME))):
        read_manifest(storage)
    assert storage.walk() == [MANIFEST_NAME]
    assert storage.read_bytes(MANIFEST_NAME) == raw


def test_duplicate_and_reserved_files_are_refused() -> None:
    raw = _raw()
    raw["files"].append(raw["files"][0])
    with pytest.raises(CorruptCheckpointError, match="more than once"):
        CheckpointManifest.from_json(raw, url="s3://b/m.json")
    record = FileRecord(MANIFEST_NAME, 1, "00000000")
    with pytest.raises(InvalidArgumentError, match="commit objects"):
        CheckpointManifest(checkpoint_path=".", world_size=1, timestamp=utc_timestamp(), files=[record])


def test_constructing_a_bad_manifest_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="world_size"):
        CheckpointManifest(checkpoint_path=".", world_size=0, timestamp=utc_timestamp())
    with pytest.raises(ValueError, match="sharing_pattern"):
        ComponentManifest("x", "sometimes", [0])


def test_components_are_an_object_keyed_by_component_key() -> None:
    raw = _raw()
    assert isinstance(raw["components"], dict)
    assert list(raw["components"]) == ["optimizer", "rng", "ema", "sampler"]
    assert raw["components"]["rng"]["files"] == ["rng_state_rank_0.pt", "rng_state_rank_1.pt"]
    manifest = CheckpointManifest.from_json(raw)
    assert manifest.components["ema"].replicated_across == [0, 1]


def test_older_manifest_with_a_component_list_still_loads() -> None:
    raw = _raw()
    raw["components"] = list(raw["components"].values())
    assert CheckpointManifest.from_json(raw) == _manifest()


def test_component_keyed_under_another_name_is_corrupt() -> None:
    raw = _raw()
    raw["components"]["optimizer"]["key"] = "scheduler"
    with pytest.raises(CorruptCheckpointError, match="components"):
        CheckpointManifest.from_json(raw)


def test_duplicate_component_keys_in_a_list_are_corrupt() -> None:
    raw = _raw()
    entries = list(raw["components"].values())
    raw["components"] = [entries[0], entries[0]]
    with pytest.raises(CorruptCheckpointError, match="more than once"):
        CheckpointManifest.from_json(raw)
