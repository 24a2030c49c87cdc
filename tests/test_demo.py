"""The demo runs end to end on tiny settings and writes its report and plots."""

from __future__ import annotations

import pytest

from nnfim import demo


def test_demo_writes_report_and_plots(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--epochs", "1", "--n-fisher", "64"]) == 0
    report = (out / "report.md").read_text()
    for name in (
        "PMatDense",
        "PMatDiag",
        "PMatBlockDiag",
        "PMatImplicit",
        "EWC penalty",
    ):
        assert name in report
    for png in ("spectrum.png", "representations.png"):
        assert (out / png).stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_demo_unwritable_output(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert demo.main(["--out", str(blocker / "sub"), "--epochs", "1"]) == 1
    assert "cannot write" in capsys.readouterr().err
