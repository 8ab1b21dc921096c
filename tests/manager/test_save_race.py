"""Two processes saving the same checkpoint name at once: never both succeed, never a mix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from crash_child import build
from race_child import CHECKPOINT_ID
from reliability_figures import record

from ckptio.checkpoint import verify_checkpoint
from ckptio.checkpoint.layout import checkpoint_key
from ckptio.storage import open_storage

CHILD = str(Path(__file__).with_name("race_child.py"))
ROUNDS = 5
WRITERS = (101, 202)


def _race(backend_url, start_delay: float) -> list[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(CHILD).parent)}
    start_at = time.time() + start_delay
    children = [
        subprocess.Popen(
            [sys.executable, CHILD, backend_url.url, json.dumps(backend_url.storage_options), str(v), str(start_at)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        for v in WRITERS
    ]
    outputs = []
    for child in children:
        out, _ = child.communicate(timeout=240)
        assert child.returncode == 0, out
        outputs.append(out.strip().splitlines()[-1])
    return outputs


def _loaded_value(backend_url, path: str) -> set[float]:
    manager, model, provider = build(backend_url.url, backend_url.storage_options)
    manager.load_checkpoint(path)
    values = {float(v) for p in model.parameters() for v in torch.unique(p.detach())}
    return values | {float(provider.progress.step), float(provider.extra.step)}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend_url", ["local", "s3", "gcs"], indirect=True)
def test_two_savers_racing_on_one_name_never_both_succeed_nor_mix(backend_url) -> None:
    storage = open_storage(backend_url.url, **backend_url.storage_options)
    path = storage.url_of(checkpoint_key(CHECKPOINT_ID))
    outcomes = []
    for round_ in range(ROUNDS):
        storage.delete_prefix(checkpoint_key(CHECKPOINT_ID))
        results = _race(backend_url, start_delay=4.0)
        saved = [v for v, r in zip(WRITERS, results, strict=True) if r == "SAVED"]
        refused = [r for r in results if r != "SAVED"]
        assert len(saved) <= 1, f"round {round_}: both savers were told they succeeded: {results}"
        for message in refused:
            assert message.startswith("REFUSED "), message
            assert path in message, f"the loser's error does not name the checkpoint: {message}"
        if saved:
            assert verify_checkpoint(path, storage_options=backend_url.storage_options) == []
            assert _loaded_value(backend_url, path) == {float(saved[0])}, f"round {round_}: a mixed checkpoint"
        outcomes.append((saved, refused))
    assert any(saved for saved, _ in outcomes), f"no saver ever succeeded: {outcomes}"
    record("two savers racing on one checkpoint name", backend=backend_url.name, races=ROUNDS,
           both_succeeded=0, mixed=0)
