"""eval_metrics.json: round trip, refusal of non-JSON values, and keeping the manifest true."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ckptio.checkpoint import (
    MANIFEST_NAME,
    METRICS_NAME,
    CheckpointStatus,
    checkpoint_status,
    decode_metrics,
    encode_metrics,
    load_checkpoint_metrics,
    read_manifest,
    save_checkpoint_metrics,
    verify_checkpoint,
)
from ckptio.errors import CorruptCheckpointError, InvalidArgumentError
from ckptio.storage import FaultInjectingStorage, SimulatedCrash, Storage

METRICS = {"loss": 0.25, "accuracy": 0.875, "step": 100, "name": "eval", "per_task": {"a": [1, 2.5]}, "ok": True}


def test_round_trip(storage: Storage, backend_url) -> None:
    assert load_checkpoint_metrics(storage) is None
    save_checkpoint_metrics(backend_url.url, METRICS, storage_options=backend_url.storage_options)
    assert load_checkpoint_metrics(backend_url.url, storage_options=backend_url.storage_options) == METRICS
    assert json.loads(storage.read_bytes(METRICS_NAME)) == METRICS


def test_new_metrics_replace_old_ones(storage: Storage) -> None:
    save_checkpoint_metrics(storage, {"loss": 1.0})
    save_checkpoint_metrics(storage, {"loss": 0.5})
    assert load_checkpoint_metrics(storage) == {"loss": 0.5}


def test_numpy_scalars_become_plain_numbers(storage: Storage) -> None:
    save_checkpoint_metrics(storage, {"loss": np.float32(0.5), "n": np.int64(3)})
    loaded = load_checkpoint_metrics(storage)
    assert loaded == {"loss": 0.5, "n": 3}
    assert (type(loaded["loss"]), type(loaded["n"])) == (float, int)


@pytest.mark.parametrize(
    ("metrics", "where"),
    [
        ({"loss": float("nan")}, "metrics['loss']"),
        ({"loss": float("inf")}, "metrics['loss']"),
        ({"eval": {"loss": -float("inf")}}, "metrics['eval']['loss']"),
        ({"curve": [1.0, float("nan")]}, "metrics['curve'][1]"),
        ({"model": object()}, "metrics['model']"),
        ({"bytes": b"x"}, "metrics['bytes']"),
        ({"eval": {3: 1.0}}, "metrics['eval']"),
    ],
)
def test_non_json_values_are_refused_naming_the_key(metrics: dict, where: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(where)):
        encode_metrics(metrics, url="gs://b/run/checkpoint-1/eval_metrics.json")


def test_refused_metrics_write_nothing(storage: Storage) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(storage.url_of(METRICS_NAME))):
        save_checkpoint_metrics(storage, {"loss": float("nan")})
    assert storage.walk() == []


def test_metrics_must_be_a_dict() -> None:
    with pytest.raises(InvalidArgumentError, match="expected a dict"):
        encode_metrics([("loss", 1.0)])  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"{oops", b"[1, 2]", b'{"loss": NaN}', b"\xff"], ids=["syntax", "list", "nan", "utf8"])
def test_malformed_metrics_are_corrupt_and_name_the_url(raw: bytes) -> None:
    url = "gs://b/run/checkpoint-1/eval_metrics.json"
    with pytest.raises(CorruptCheckpointError, match=re.escape(url)):
        decode_metrics(raw, url=url)


def test_loading_malformed_metrics_names_the_url_and_changes_nothing(storage: Storage) -> None:
    storage.write_bytes(METRICS_NAME, b"{oops")
    with pytest.raises(CorruptCheckpointError, match=re.escape(storage.url_of(METRICS_NAME))):
        load_checkpoint_metrics(storage)
    assert storage.read_bytes(METRICS_NAME) == b"{oops"


def test_equal_metrics_encode_to_equal_bytes() -> None:
    assert encode_metrics({"b": 1, "a": 2.0}) == encode_metrics({"a": 2.0, "b": 1})


# -- metrics of a committed checkpoint -----------------------------------------------


def _committed_with_metrics(make_checkpoint) -> Storage:
    return make_checkpoint("checkpoint-1", {"model.safetensors": b"w" * 8, METRICS_NAME: encode_metrics({"loss": 1.0})})


def test_new_metrics_keep_a_committed_checkpoint_complete_and_verified(make_checkpoint) -> None:
    checkpoint = _committed_with_metrics(make_checkpoint)
    new = {"loss": 0.123456789, "accuracy": 0.5}
    assert len(encode_metrics(new)) != len(encode_metrics({"loss": 1.0}))
    save_checkpoint_metrics(checkpoint, new)
    assert load_checkpoint_metrics(checkpoint) == new
    assert checkpoint_status(checkpoint) is CheckpointStatus.COMPLETE
    assert verify_checkpoint(checkpoint) == []
    manifest = read_manifest(checkpoint)
    assert manifest is not None and manifest.file_record(METRICS_NAME).size == len(encode_metrics(new))


def test_a_crash_while_replacing_metrics_leaves_the_checkpoint_complete(make_checkpoint) -> None:
    probe = FaultInjectingStorage(_committed_with_metrics(make_checkpoint))
    save_checkpoint_metrics(probe, {"loss": 0.5})
    assert probe.operations == 4  # read manifest, rewrite it without metrics, write metrics, rewrite it
    for ops in range(probe.operations):
        checkpoint = _committed_with_metrics(make_checkpoint)
        with pytest.raises(SimulatedCrash):
            save_checkpoint_metrics(FaultInjectingStorage(checkpoint, fail_after_ops=ops, crash=True), {"loss": 0.5})
        assert checkpoint_status(checkpoint) is CheckpointStatus.COMPLETE, ops
        assert verify_checkpoint(checkpoint) == [], ops


def test_a_malformed_manifest_stops_the_save_before_anything_is_written(make_checkpoint) -> None:
    checkpoint = _committed_with_metrics(make_checkpoint)
    checkpoint.write_bytes(MANIFEST_NAME, b"{")
    before = checkpoint.read_bytes(METRICS_NAME)
    with pytest.raises(CorruptCheckpointError, match=re.escape(checkpoint.url_of(MANIFEST_NAME))):
        save_checkpoint_metrics(checkpoint, {"loss": 0.5})
    assert checkpoint.read_bytes(METRICS_NAME) == before


def test_metrics_of_an_uncommitted_checkpoint_do_not_touch_the_manifest(make_checkpoint) -> None:
    checkpoint = make_checkpoint("checkpoint-1")  # manifest does not list metrics
    manifest_before = checkpoint.read_bytes(MANIFEST_NAME)
    save_checkpoint_metrics(checkpoint, {"loss": 0.5})
    assert checkpoint.read_bytes(MANIFEST_NAME) == manifest_before
    assert checkpoint_status(checkpoint) is CheckpointStatus.COMPLETE
