"""Fuzzing the parsers of untrusted files: a valid result or a CkptioError, nothing else.

The safetensors header parser, the shard index parser and the manifest parser get
arbitrary bytes and near-valid JSON (valid documents with fields replaced by odd
values). Each must return a result that holds together or raise a
:class:`~ckptio.errors.CkptioError`: never another exception, never hang (a
deadline per example), never allocate much memory (the parsers only ever see the
bytes given; a length claiming gigabytes is refused before any read). Runs are
derandomized, so CI sees the same examples every time; the whole file takes
about a minute at most.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_figures import record

from ckptio.checkpoint.manifest import CheckpointManifest
from ckptio.errors import CkptioError
from ckptio.format.index import parse_index
from ckptio.format.safetensors_io import parse_header

FUZZ = settings(
    max_examples=1500,
    deadline=1000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
URL = "memory://fuzz/checkpoint-1/file"
MEMORY_LIMIT = 32 * 2**20

# -- near-valid JSON -----------------------------------------------------------------------------

_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["..", "../x", "/etc/passwd", "s3://b/k", "file:///x", "C:\\x", "", "./a", "a//b", "F32", "BF16"]),
    st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
)


def _mutated(document: Any, draw: Callable[..., Any]) -> Any:
    """``document`` with a few values, anywhere in it, replaced by odd ones (or keys dropped)."""
    if isinstance(document, dict):
        out = {}
        for key, value in document.items():
            choice = draw(st.integers(0, 9))
            if choice == 0:
                continue  # drop the key
            out[key] = draw(_ODD) if choice == 1 else _mutated(value, draw)
        return out
    if isinstance(document, list):
        return [draw(_ODD) if draw(st.integers(0, 9)) == 0 else _mutated(v, draw) for v in document]
    return document


@st.composite
def near_valid(draw: Callable[..., Any], valid: Any) -> bytes:
    return json.dumps(_mutated(valid, draw)).encode()


_VALID_HEADER = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
}
_VALID_INDEX = {"metadata": {"total_size": 24}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "x.bin"}}
_VALID_MANIFEST = {
    "format_version": 1,
    "checkpoint_path": "checkpoints/checkpoint-1",
    "checkpoint_id": 1,
    "world_size": 1,
    "timestamp": "2024-05-01T12:00:00.000000+00:00",
    "library_version": "0.1.0",
    "torch_version": "2.5.0",
    "components": {
        "optimizer": {
            "key": "optimizer",
            "sharing_pattern": "global",
            "ranks": [0],
            "replicated_across": None,
            "group_name": None,
            "size_bytes": 10,
            "checksum": None,
            "metadata": {},
            "files": ["optimizer_state.pt"],
        }
    },
    "best_checkpoints": [],
    "files": [{"path": "optimizer_state.pt", "size": 10, "crc32c": "0123abcd"}],
    "metadata": {},
}


def _shard(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# -- the harness ---------------------------------------------------------------------------------

_COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _record_examples() -> Iterator[None]:
    """Once this module's tests have run: how many examples each parser was given."""
    yield
    for parser, count in sorted(_COUNTS.items()):
        record("fuzz", parser=parser, examples=count)


@contextmanager
def _bounded(parser: str) -> Iterator[None]:
    """Count the example, and fail if it allocates more than MEMORY_LIMIT or raises a non-ckptio error."""
    _COUNTS[parser] = _COUNTS.get(parser, 0) + 1
    tracemalloc.start()
    try:
        try:
            yield
        except CkptioError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{parser} allocated {peak} bytes"


def _check_header(data: bytes, object_size: int) -> None:
    with _bounded("safetensors header"):
        header = parse_header(data, object_size, URL)
        position = header.data_start
        for entry in sorted(header.entries.values(), key=lambda e: (e.start, e.end)):
            assert entry.start == position and entry.end >= entry.start
            position = entry.end
        assert position == object_size


def _check_index(data: bytes) -> None:
    with _bounded("index"):
        index = parse_index(data, URL)
        assert isinstance(index["metadata"], dict)
        for name, shard in index["weight_map"].items():
            assert isinstance(name, str) and isinstance(shard, str)
            assert ".." not in shard.split("/") and "://" not in shard and not shard.startswith("/")


def _check_manifest(data: bytes) -> None:
    with _bounded("manifest"):
        manifest = CheckpointManifest.from_json(data, url=URL)
        for r in manifest.files:
            assert ".." not in r.path.split("/") and "://" not in r.path and not r.path.startswith("/")


# -- safetensors header --------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=2**64))
def test_header_parser_on_arbitrary_bytes(data: bytes, object_size: int) -> None:
    _check_header(data, object_size)


@FUZZ
@given(near_valid(_VALID_HEADER), st.integers(min_value=-4, max_value=40))
def test_header_parser_on_near_valid_headers(header: bytes, extra: int) -> None:
    _check_header(_shard(header), 8 + len(header) + max(0, 24 + extra))


@FUZZ
@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=64))
def test_header_parser_on_any_length_prefix(length: int, rest: bytes) -> None:
    data = struct.pack("<Q", length) + rest
    _check_header(data, len(data))


# -- shard index ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=256))
def test_index_parser_on_arbitrary_bytes(data: bytes) -> None:
    _check_index(data)


@FUZZ
@given(near_valid(_VALID_INDEX))
def test_index_parser_on_near_valid_json(data: bytes) -> None:
    _check_index(data)


# -- manifest ------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=256))
def test_manifest_parser_on_arbitrary_bytes(data: bytes) -> None:
    _check_manifest(data)


@FUZZ
@given(near_valid(_VALID_MANIFEST))
def test_manifest_parser_on_near_valid_json(data: bytes) -> None:
    _check_manifest(data)


@pytest.mark.parametrize(
    "payload",
    [b"[" * 200_000, b'{"a":' * 200_000, b"9" * 20_000, b'{"a": 1, "a": 2}', b'{"x": NaN}', b"\xff\xfe{}"],
    ids=["deep-list", "deep-object", "huge-integer", "duplicate-key", "nan", "not-utf8"],
)
def test_every_parser_refuses_pathological_json(payload: bytes) -> None:
    _check_header(_shard(payload), 8 + len(payload))
    _check_index(payload)
    _check_manifest(payload)
