"""The hostile input corpus: every damaged checkpoint is refused with a ckptio error, harmlessly.

For each case of :data:`corpus.CASES` on each backend: the error names the file's
URL and the problem; no payload runs (its sentinel file never appears); nothing
outside the checkpoint reaches the model or optimizer; and every stored object,
of this run and around it, is byte for byte what it was before.
"""

from __future__ import annotations

import argparse
import os
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from corpus import (
    CASES,
    CKPT,
    OUTSIDE_VALUE,
    Case,
    Context,
    build_run,
    make_manager,
    tiny_model,
)
from reliability_figures import record
from servers import BackendTarget

import ckptio
from ckptio.cli.commands import cmd_inspect
from ckptio.errors import CkptioError
from ckptio.storage import Storage, open_storage

BACKENDS = ["local", "memory", "s3"]
#: Most Python memory one refusal may allocate (a header claiming gigabytes must not be read).
MEMORY_LIMIT = 16 * 2**20


def _params() -> list[Any]:
    return [
        pytest.param(backend, case, id=f"{backend}-{case.name}")
        for case in CASES
        for backend in BACKENDS
        if backend == "local" or not case.local_only
    ]


def _local_tree(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` by path: its bytes, or ``-> target`` for a symbolic link (never followed)."""
    tree: dict[str, bytes | str] = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            tree[path] = "-> " + os.readlink(path) if os.path.islink(path) else Path(path).read_bytes()
    return tree


def _snapshot(target: BackendTarget, tmp_path: Path) -> dict[str, Any]:
    """Every object of the test's storage prefix and every local file of the test, with their bytes."""
    snapshot: dict[str, Any] = {"local": _local_tree(tmp_path)}
    if target.name != "local":
        storage = open_storage(target.url, **target.storage_options)
        snapshot["remote"] = {key: storage.read_bytes(key) for key in storage.walk()}
    return snapshot


def _refusal(action: Callable[[], object]) -> str:
    """Run ``action``, which must raise a ckptio error; return its message with its causes'."""
    with pytest.raises(CkptioError) as caught:
        action()
    messages: list[str] = []
    exc: BaseException | None = caught.value
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        messages.append(str(exc))
        exc = exc.__cause__
    return " <- ".join(messages)


def _verify(url: str, options: dict[str, Any]) -> str:
    """What verification says: the problems it reports, or the ckptio error it raises."""
    try:
        problems = ckptio.verify_checkpoint(url, storage_options=options)
    except CkptioError as exc:
        return str(exc)
    assert problems, f"verify_checkpoint found nothing wrong with {url}"
    assert not ckptio.validate_checkpoint(url, storage_options=options, verify_checksums=True)
    return "; ".join(problems)


def _attempts(case: Case, run_url: str, ckpt_url: str, options: dict[str, Any]) -> dict[str, str]:
    """Each entry point of ``case.checks`` on the damaged checkpoint: the message it refused with."""
    messages: dict[str, str] = {}
    model = tiny_model(5)
    if "load" in case.checks:
        with make_manager(run_url, options, model) as manager:
            messages["load"] = _refusal(lambda: manager.load_checkpoint("checkpoint-2"))
            lrs = [g["lr"] for g in manager.provider.optimizer.param_groups]  # type: ignore[union-attr]
            assert OUTSIDE_VALUE not in lrs
    if "weights" in case.checks:
        messages["weights"] = _refusal(lambda: ckptio.load_checkpoint(ckpt_url, model, storage_options=options))
    if "inspect" in case.checks:
        args = argparse.Namespace(path=ckpt_url, json=True)
        messages["inspect"] = _refusal(lambda: cmd_inspect(args, options))
    if "verify" in case.checks:
        messages["verify"] = _verify(ckpt_url, options)
        with make_manager(run_url, options, model, verify_checksums_on_load=True) as manager:
            messages["verifying load"] = _refusal(lambda: manager.load_checkpoint("checkpoint-2"))
    assert all(OUTSIDE_VALUE not in t for t in model.state_dict().values()), "a file outside the checkpoint was read"
    return messages


@pytest.mark.parametrize(("backend_url", "case"), _params(), indirect=["backend_url"])
def test_hostile_checkpoint_is_refused_harmlessly(
    backend_url: BackendTarget, case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # Even a process told to load pickles unrestricted must not run one from a checkpoint.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    options = backend_url.storage_options
    run_url = f"{backend_url.url}/run"
    build_run(run_url, options, safetensors=case.safetensors)
    ckpt: Storage = open_storage(run_url, **options).child(CKPT)
    outside = tmp_path / "outside"
    outside.mkdir()
    ctx = Context(ckpt, str(outside), str(outside / "SENTINEL"))
    damaged = case.corrupt(ctx)
    file_url = ckpt.url_of(case.names or damaged)
    before = _snapshot(backend_url, tmp_path)

    tracemalloc.start()
    try:
        messages = _attempts(case, run_url, ckpt.url, options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert not os.path.exists(ctx.sentinel), "a pickled payload ran"
    assert _snapshot(backend_url, tmp_path) == before, "a stored object was changed, added or deleted"
    assert peak < MEMORY_LIMIT, f"refusing {case.name} allocated {peak} bytes"
    for entry, message in messages.items():
        assert file_url in message, f"{entry}: the error does not name {file_url}: {message}"
        assert re.search(case.problem, message), f"{entry}: the error does not say {case.problem!r}: {message}"
    capsys.readouterr()
    record(
        "hostile input",
        backend=backend_url.name,
        case=case.name,
        category=case.category,
        inputs=1,
        entry_points=len(messages),
        code_executed=0,
        objects_changed=0,
    )
