"""The nnfim command end to end on tiny settings, and its handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnfim import cli
from nnfim.apps import load_run
from nnfim.models import MODELS, build_model

TINY_TRACK = [
    "--dataset", "synthetic", "--epochs", "1", "--batch-size", "512",
    "--every", "2", "--max-examples", "8", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["track", "--out", str(out), *TINY_TRACK]) == 0
    return out


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_track_writes_a_loadable_run(run_dir: Path) -> None:
    run = load_run(run_dir)
    assert run.meta["model"] == "mlp" and run.meta["batch_size"] == 512
    assert run.records["iteration"].tolist() == [0, 2]  # 3 steps, every 2
    assert run.eigenvalues.shape == (2, 80)
    assert np.isfinite(run.epochs["test_acc"]).all()
    state = torch.load(run_dir / "model.pt", weights_only=True)
    build_model("mlp").load_state_dict(state)
    if pytest.importorskip("matplotlib"):
        assert (run_dir / "run.png").stat().st_size > 5000
    assert not leftovers(run_dir.parent)


@pytest.mark.parametrize("model", [m for m in MODELS if m != "mlp"])
def test_track_other_models(tmp_path, model: str) -> None:
    out = tmp_path / model
    args = ["track", "--model", model, "--out", str(out), *TINY_TRACK]
    assert cli.main([*args, "--max-examples", "4"]) == 0
    assert load_run(out).meta["model"] == model


def test_spectrum(run_dir: Path, tmp_path) -> None:
    out = tmp_path / "spectrum"
    args = ["--n-examples", "16", "--k", "2", "--probes", "2", "--iters", "6"]
    assert cli.main(["spectrum", str(run_dir), "--out", str(out), *args]) == 0
    result = json.loads((out / "spectrum.json").read_text())
    gram = result["Fisher Gram dual"]
    # the GGN's top Lanczos eigenvalues are the Fisher's, seen through the Gram dual
    np.testing.assert_allclose(
        result["GGN (= Fisher)"]["top"][:1], gram["eigenvalues"][:1], rtol=1e-3
    )
    assert gram["rank"] <= 16 * 9
    for png in ("density.png", "eigenvalues.png"):
        assert (out / png).stat().st_size > 5000


def test_landscape(run_dir: Path, tmp_path) -> None:
    out = tmp_path / "landscape"
    args = ["--n-examples", "16", "--points", "5", "--grid", "3"]
    assert cli.main(["landscape", str(run_dir), "--out", str(out), *args]) == 0
    data = np.load(out / "landscape.npz")
    assert data["curves"].shape == (4, 5) and data["surface"].shape == (3, 3)
    # the middle point is the trained weights for every direction
    np.testing.assert_allclose(data["curves"][:, 2], data["curves"][0, 2], rtol=1e-6)
    assert (out / "landscape_1d.png").exists() and (out / "landscape_2d.png").exists()


def test_compare(run_dir: Path, tmp_path) -> None:
    out = tmp_path / "compare"
    assert (
        cli.main(["compare", str(run_dir), "--out", str(out), "--n-examples", "8"]) == 0
    )
    rows = json.loads((out / "compare.json").read_text())
    for exact in ("PMatLowRank", "PMatImplicit"):
        assert rows[exact]["mv_rel_err"] < 1e-4
        assert rows[exact]["eig_overlap"] > 0.999
    assert rows["PMatDiag"]["mv_rel_err"] > 1e-3
    assert "PMatKFAC" in (out / "compare.md").read_text()
    assert (out / "representations.png").stat().st_size > 5000


def test_plot_one_and_several(run_dir: Path, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(run_dir), "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "run.png").stat().st_size > 5000
    several = ["plot", str(run_dir), str(run_dir), "--out", str(tmp_path / "two")]
    assert cli.main(several) == 0
    assert (tmp_path / "two" / "runs.png").stat().st_size > 5000


def test_demo_tiny(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    assert cli.main(["demo", "--tiny", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert not (out / "stale.txt").exists()  # replaced as a whole
    for png in report.split("](")[1:]:
        target = png.split(")")[0]
        assert (out / target).exists(), target
    assert "PMatKFAC" in report and "Hessian" in report
    assert not leftovers(tmp_path)
    assert "wrote" in capsys.readouterr().out


def one_line_error(capsys, status: int, code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert status == code
    assert len(err) == 1 and needle in err[0], err


def test_missing_run(tmp_path, capsys) -> None:
    missing = tmp_path / "nope"
    status = cli.main(["spectrum", str(missing)])
    one_line_error(capsys, status, 1, "run.json is missing")
    assert not missing.exists()
    status = cli.main(["plot", str(missing), "--out", str(tmp_path / "p")])
    one_line_error(capsys, status, 1, "not an nnfim run")
    assert not (tmp_path / "p").exists() and not leftovers(tmp_path)


def test_corrupt_run(run_dir: Path, tmp_path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("run.json", "model.pt"):
        (bad / name).write_bytes((run_dir / name).read_bytes())
    (bad / "run.npz").write_bytes(b"garbage")
    status = cli.main(["landscape", str(bad)])
    one_line_error(capsys, status, 1, "unreadable run arrays")
    assert not (bad / "landscape").exists() and not leftovers(bad)
    (bad / "run.npz").write_bytes((run_dir / "run.npz").read_bytes())
    (bad / "model.pt").write_bytes(b"garbage")
    status = cli.main(["compare", str(bad), "--n-examples", "4"])
    one_line_error(capsys, status, 1, "unreadable model weights")
    assert not (bad / "compare").exists() and not leftovers(bad)


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--dataset", "mnist"], "unknown dataset"),
    ],
)
def test_unknown_names(tmp_path, capsys, option, needle) -> None:
    out = tmp_path / "run"
    status = cli.main(["track", "--out", str(out), *TINY_TRACK, *option])
    one_line_error(capsys, status, 2, needle)
    assert not out.exists()


def test_unwritable_output(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status = cli.main(["track", "--out", str(blocker / "sub"), *TINY_TRACK])
    one_line_error(capsys, status, 1, "cannot write")
    status = cli.main(["track", "--out", str(blocker), *TINY_TRACK])
    one_line_error(capsys, status, 1, "not a directory")
    assert blocker.read_text() == "x"


def test_failure_midway_leaves_nothing(tmp_path, capsys, monkeypatch) -> None:
    def full_disk(run, path):
        (Path(path) / "run.npz").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "save_run", full_disk)
    out = tmp_path / "run"
    status = cli.main(["track", "--out", str(out), *TINY_TRACK])
    one_line_error(capsys, status, 1, "No space left")
    assert not out.exists() and not leftovers(tmp_path)


def test_console_script_and_module(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nnfim",
            "track",
            "--model",
            "nope",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "nnfim track: error: unknown model 'nope'; choose one of mlp, cnn, resnet"
    )
