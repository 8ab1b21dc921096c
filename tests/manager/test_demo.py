"""The README's demo: interrupted, resumed, and reported bit-identical."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ckptio.demo import DemoTrainer, main, run_worker
from ckptio.errors import CheckpointNotFoundError
from ckptio.manager import CheckpointConfig, CheckpointManager


def test_demo_reports_an_exact_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--output", str(tmp_path / "demo"), "--steps", "12", "--save-every", "4", "--interrupt-at", "6"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "resumed at step 4" in out
    assert "bit-identical over steps 5..12" in out


def _committed_step(output_dir: Path) -> int:
    """The training step of the latest complete checkpoint under ``output_dir``."""
    trainer = DemoTrainer(12)
    with CheckpointManager(CheckpointConfig(output_dir=str(output_dir)), trainer, model=trainer.model) as manager:
        manager.load_checkpoint(None)
    return trainer.progress.step


def test_demo_with_async_saves_resumes_from_the_latest_complete_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Killed right after step 8's save was started: that save may still be in flight, but step 4's
    # is committed (the save at step 8 waits for it first). The resume comes from one of the two.
    code = main(
        ["--output", str(tmp_path / "demo"), "--steps", "12", "--save-every", "4", "--interrupt-at", "8", "--async"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "last save started at step 8, possibly still being written" in out
    found = re.search(r"resumed at step (\d+) from (checkpoint-\d+)", out)
    assert found is not None, out
    step, name = int(found[1]), found[2]
    assert (step, name) in {(4, "checkpoint-1"), (8, "checkpoint-2")}, out
    assert ("had not been committed" in out) == (step == 4), out
    assert f"bit-identical over steps {step + 1}..12" in out
    # The resumed child ended normally: its last save (step 12) was committed before it exited.
    (run,) = (tmp_path / "demo").glob("run-*")
    assert _committed_step(run) == 12


def test_async_worker_without_a_complete_checkpoint_starts_over_and_commits_its_last_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[CheckpointManager] = []
    close = CheckpointManager.close

    def recording_close(self: CheckpointManager) -> None:
        closed.append(self)
        close(self)

    monkeypatch.setattr(CheckpointManager, "close", recording_close)
    losses = run_worker(str(tmp_path / "run"), total_steps=2, save_every=2, resume=True, async_save=True)
    assert capsys.readouterr().out.startswith("RESUMED 0 -\nLOSS 1 ")
    assert sorted(losses) == [1, 2]
    assert len(closed) == 1  # the normal end closed the manager ...
    assert _committed_step(tmp_path / "run") == 2  # ... so the save at the last step is committed on return


def test_sync_worker_without_a_checkpoint_refuses_to_resume(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        run_worker(str(tmp_path / "run"), total_steps=2, save_every=2, resume=True)
