"""The README's demo: interrupted, resumed, and reported bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptio.demo import main


def test_demo_reports_an_exact_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--output", str(tmp_path / "demo"), "--steps", "12", "--save-every", "4", "--interrupt-at", "6"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "resumed at step 4" in out
    assert "bit-identical over steps 5..12" in out
