"""One INFO line per save and per load, saying what moved how fast; the library adds no handlers."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
from manager_helpers import TinyTrainer, manager_for


def _info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.split(".")[0] == "ckptio" and r.levelno >= logging.INFO
    ]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_save_and_a_load_log_one_info_line_each(backend_url, caplog, async_save: bool) -> None:
    trainer = TinyTrainer()
    manager = manager_for(trainer, backend_url, save_total_limit=1, async_save=async_save)
    manager.save_checkpoint()
    manager.wait_until_finished()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ckptio"):
        path = manager.save_checkpoint()  # rotates checkpoint-1 out
        manager.wait_until_finished()
    [line] = _info_lines(caplog)
    assert line.startswith(f"saved checkpoint-2 to {path}: ")
    assert " GB in " in line and " GB/s)" in line
    assert "rotated out checkpoint-1" in line
    assert ("in the background" in line) is async_save
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ckptio"):
        manager.load_checkpoint(None)
    [line] = _info_lines(caplog)
    assert line.startswith(f"restored checkpoint-2 from {path}: ") and " GB/s)" in line
    manager.close()


def test_the_library_adds_no_log_handlers(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import logging
        from torch import nn
        import ckptio
        before = list(logging.getLogger().handlers)
        config = ckptio.CheckpointConfig(output_dir={str(tmp_path)!r}, async_save=True)
        with ckptio.CheckpointManager(config, None, model=nn.Linear(4, 4)) as manager:
            manager.save_checkpoint()
        manager.load_checkpoint(None)
        assert logging.getLogger("ckptio").handlers == [], logging.getLogger("ckptio").handlers
        assert logging.getLogger().handlers == before, logging.getLogger().handlers
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
