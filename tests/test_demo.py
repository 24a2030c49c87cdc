"""``python -m nnfim.demo`` still runs the demo (now ``nnfim demo``) and keeps its imports."""

from __future__ import annotations

from nnfim import demo


def test_demo_main_runs_nnfim_demo(monkeypatch) -> None:
    # the demo itself runs end to end in tests/test_cli.py::test_demo_tiny
    from nnfim import cli

    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    assert demo.main(["--quick", "--out", "x"]) == 0
    assert seen == [["demo", "--quick", "--out", "x"]]


def test_demo_unwritable_output(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert demo.main(["--out", str(blocker / "sub")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_load_digits_data_still_importable() -> None:
    x, y, source = demo.load_digits_data(0)
    assert x.shape == (1797, 64) and y.shape == (1797,) and source
