"""``python -m nnfim.demo`` still runs the demo (now ``nnfim demo``) and keeps its imports."""

from __future__ import annotations

import pytest

from nnfim import demo


def test_demo_writes_report_and_plots(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert demo.main(["--tiny", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    for name in ("PMatDense", "PMatDiag", "PMatBlockDiag", "PMatImplicit", "Hessian"):
        assert name in report
    for png in (
        "compare/representations.png",
        "spectrum/density.png",
        "plots/runs.png",
    ):
        assert (out / png).stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_demo_unwritable_output(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert demo.main(["--out", str(blocker / "sub")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_load_digits_data_still_importable() -> None:
    x, y, source = demo.load_digits_data(0)
    assert x.shape == (1797, 64) and y.shape == (1797,) and source
