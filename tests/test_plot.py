"""Every plot is produced (a non-empty PNG) without touching pyplot's state."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnfim.apps import TrainingMonitor

matplotlib = pytest.importorskip("matplotlib")
plot = pytest.importorskip("nnfim.apps.plot")

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(lr: float, bs: int, label: str | None = None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    meta = {"lr": lr, "batch_size": bs}
    if label:
        meta["label"] = label
    monitor = TrainingMonitor(every=1, metadata=meta)
    data = [(torch.randn(bs, 4), torch.randint(0, 3, (bs,))) for _ in range(3)]
    for _ in range(2):
        for xb, yb in data:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            monitor.step(model, (xb, yb), loss=loss, optimizer=opt)
            opt.step()
        monitor.epoch(model, train=data, test=data[:1])
    return monitor.run()


def check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000


def test_single_run(tmp_path) -> None:
    backend = matplotlib.get_backend()
    out = plot.plot_run(make_run(0.1, 5), tmp_path / "run.png")
    check_png(out)
    assert matplotlib.get_backend() == backend


@pytest.mark.parametrize("grid", [True, False])
def test_several_runs(tmp_path, grid: bool) -> None:
    if grid:
        runs = [make_run(lr, bs) for bs in (4, 6) for lr in (0.05, 0.2)]
    else:
        runs = [make_run(0.1, 5, "a"), make_run(0.1, 5, "b"), make_run(0.2, 4, "c")]
    check_png(plot.plot_runs(runs, tmp_path / "runs.png"))


def test_spectral_plots(tmp_path) -> None:
    from nnfim.linalg import slq

    a = torch.diag(torch.linspace(0.01, 2.0, 50, dtype=torch.float64))
    dens = slq(a, n_probes=2, n_iter=10)
    grid = torch.linspace(0, 2.2, 100, dtype=torch.float64)
    curves = {"A": (grid.numpy(), dens.density(grid).numpy())}
    check_png(plot.plot_density(curves, tmp_path / "density.png"))
    spectra = {"all": np.geomspace(1, 1e-4, 60), "top": np.array([1.0, 0.5])}
    check_png(plot.plot_eigenvalues(spectra, tmp_path / "eig.png"))


def test_landscape_plots(tmp_path) -> None:
    alphas = np.linspace(-1, 1, 11)
    curves = {"eigvec": 1 + alphas**2, "random": 1 + 0.01 * alphas**2}
    check_png(plot.plot_landscape_1d(alphas, curves, tmp_path / "l1.png"))
    z = 1 + alphas[:, None] ** 2 + 0.5 * alphas[None] ** 2
    check_png(plot.plot_landscape_2d(alphas, alphas, z, tmp_path / "l2.png"))


def test_representation_plot(tmp_path) -> None:
    rows = {
        "PMatDense": {"mv_rel_err": 0.0, "solve_rel_err": 0.0, "eig_overlap_err": 0.0},
        "PMatDiag": {
            "mv_rel_err": 0.5,
            "solve_rel_err": float("nan"),
            "eig_overlap_err": 0.2,
        },
        "PMatImplicit": {
            "mv_rel_err": 1e-7,
            "solve_rel_err": 0.0,
            "eig_overlap_err": 0.0,
        },
    }
    check_png(plot.plot_representations(rows, tmp_path / "rep.png"))


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(ImportError, match=r"nnfim\[plot\]"):
        plot.plot_landscape_1d(np.zeros(2), {"a": np.zeros(2)}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
