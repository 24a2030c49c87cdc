"""PNG plots of runs, spectra, landscapes and representation quality (matplotlib).

matplotlib is optional (``pip install nnfim[plot]``) and imported only here,
on first use. Figures are drawn on :class:`matplotlib.figure.Figure` objects,
without ``pyplot``: the user's backend and global state are left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnfim.apps.monitor import Run

__all__ = [
    "plot_density",
    "plot_eigenvalues",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_representations",
    "plot_run",
    "plot_runs",
]


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "nnfim's plots need matplotlib: pip install 'nnfim[plot]' (or matplotlib)."
        ) from err
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


def _finite(a: np.ndarray) -> np.ndarray:
    return np.isfinite(a)


def _draw_loss(ax: Any, run: Run) -> None:
    it, loss = run.steps["iteration"], run.steps["loss"]
    ok = _finite(loss)
    if ok.any():
        ax.plot(it[ok], loss[ok], lw=0.8, alpha=0.6, label="mini-batch loss")
    ep = run.epochs
    for key, style in (("train_loss", "o-"), ("test_loss", "s-")):
        good = _finite(ep[key])
        if good.any():
            ax.plot(ep["iteration"][good], ep[key][good], style, ms=4, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _draw_condition(ax: Any, run: Run) -> None:
    rec = run.records
    it = rec["iteration"]
    cond, avg = rec["condition_number"], rec["condition_number_avg"]
    ok = _finite(cond) & (cond > 0)
    if ok.any():
        ax.semilogy(it[ok], cond[ok], ".", ms=3, alpha=0.5, label="per mini-batch")
    ok = _finite(avg) & (avg > 0)
    if ok.any():
        ax.semilogy(it[ok], avg[ok], "-", lw=1.5, label="running average")
    rtol = run.meta.get("rtol")
    if isinstance(rtol, (int, float)) and rtol > 0:
        ax.axhline(
            1 / rtol,
            color="grey",
            ls=":",
            lw=1,
            label=f"1/rtol: zero threshold {rtol:g}",
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("lambda_max / lambda_min (nonzero)")
    ax.set_title("Condition number of the mini-batch Fisher")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _draw_spectrum_time(ax: Any, run: Run) -> None:
    evals = run.eigenvalues
    it = run.records["iteration"]
    if evals.size:
        top = np.nanmax(evals, axis=1, initial=0.0)
        floor = np.where(top > 0, top, 1.0) * 1e-5
        mask = _finite(evals) & (evals > floor[:, None])
        xs = np.broadcast_to(it[:, None], evals.shape)[mask]
        ax.scatter(xs, evals[mask], s=2, alpha=0.25, lw=0, label="all nonzero")
        ranks = [1, 5, 20]
        for r in ranks:
            if evals.shape[1] >= r:
                ax.plot(it, evals[:, r - 1], lw=1.2, label=f"lambda_{r}")
        ax.set_yscale("log")
        ax.legend(fontsize="small", markerscale=4)
    ax.set_xlabel("iteration")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Mini-batch Fisher spectrum over time")


def _draw_last_spectrum(ax: Any, run: Run) -> None:
    evals = run.eigenvalues
    rtol = float(run.meta.get("rtol", 0.0) or 0.0)
    if evals.size:
        rows = np.linspace(0, len(evals) - 1, min(4, len(evals))).astype(int)
        for i in sorted(set(rows.tolist())):
            e = evals[i][_finite(evals[i])]
            e = e[e > rtol * e.max()] if e.size else e
            if e.size:
                ax.loglog(
                    np.arange(1, e.size + 1),
                    e,
                    lw=1.2,
                    label=f"iteration {int(run.records['iteration'][i])}",
                )
        ax.legend(fontsize="small")
    ax.set_xlabel("rank (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"Nonzero spectrum at a few iterations (> {rtol:g} lambda_max)")


def _draw_accuracy(ax: Any, run: Run) -> None:
    ep = run.epochs
    for key, style in (("train_acc", "o-"), ("test_acc", "s-")):
        good = _finite(ep[key])
        if good.any():
            ax.plot(ep["epoch"][good] + 1, 100 * ep[key][good], style, ms=4, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _draw_grad(ax: Any, run: Run) -> None:
    rec = run.records
    ok = _finite(rec["grad_norm"]) & (rec["grad_norm"] > 0)
    if ok.any():
        ax.semilogy(rec["iteration"][ok], rec["grad_norm"][ok], lw=1, label="||grad||")
    ok = _finite(rec["lambda_max"]) & (rec["lambda_max"] > 0)
    if ok.any():
        ax.semilogy(
            rec["iteration"][ok], rec["lambda_max"][ok], lw=1, label="lambda_max"
        )
    lr = rec["lr"]
    if _finite(lr).any() and np.nanmax(lr) > 0:
        sharp = 2 / np.where(lr > 0, lr, np.nan)
        ax.semilogy(rec["iteration"], sharp, "--", lw=1, label="2 / lr")
    ax.set_xlabel("iteration")
    ax.set_title("Gradient norm and sharpness")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot_run(run: Run, path: str | Path, title: str | None = None) -> Path:
    """One run: loss, accuracy, gradient norm, condition number and spectra.

    Args:
        run: a :class:`~nnfim.apps.Run` (``load_run(dir)`` or ``monitor.run()``).
        path: the PNG to write.
        title: the figure's title (default: the run's label).

    Returns:
        ``path``.
    """
    fig = _figure(15, 8.5)
    axes = fig.subplots(2, 3)
    _draw_loss(axes[0, 0], run)
    _draw_accuracy(axes[0, 1], run)
    _draw_grad(axes[0, 2], run)
    _draw_condition(axes[1, 0], run)
    _draw_spectrum_time(axes[1, 1], run)
    _draw_last_spectrum(axes[1, 2], run)
    fig.suptitle(title or run.label)
    return _save(fig, path)


def _grid(runs: Sequence[Run]) -> tuple[list[Any], list[Any]]:
    lrs = sorted({r.meta.get("lr") for r in runs}, key=lambda v: (v is None, v))
    bss = sorted({r.meta.get("batch_size") for r in runs}, key=lambda v: (v is None, v))
    if len(lrs) * len(bss) == len(runs):
        return bss, lrs
    return [None], list(range(len(runs)))


def plot_runs(runs: Sequence[Run], path: str | Path) -> Path:
    """Several runs side by side: condition number (log, shared axis) and loss.

    When the runs form a grid of learning rates x batch sizes (from their
    metadata ``lr`` and ``batch_size``) the panels are laid out that way:
    rows are batch sizes, columns learning rates.

    Returns:
        ``path``.
    """
    if not runs:
        raise ValueError("plot_runs: no runs given.")
    rows, cols = _grid(runs)
    fig = _figure(4.2 * len(cols), 3.4 * len(rows) + 0.6)
    axes = np.atleast_2d(
        np.asarray(fig.subplots(len(rows), len(cols), sharey=True, squeeze=False))
    )
    placed: dict[tuple[int, int], Run] = {}
    if rows == [None]:
        placed = {(0, j): r for j, r in enumerate(runs)}
    else:
        for r in runs:
            placed[
                (rows.index(r.meta.get("batch_size")), cols.index(r.meta.get("lr")))
            ] = r
    for (i, j), run in placed.items():
        ax = axes[i, j]
        rec = run.records
        ok = _finite(rec["condition_number"]) & (rec["condition_number"] > 0)
        ax.semilogy(
            rec["iteration"][ok],
            rec["condition_number"][ok],
            ".",
            ms=2,
            alpha=0.4,
            color="tab:blue",
        )
        ok = _finite(rec["condition_number_avg"])
        ax.semilogy(
            rec["iteration"][ok],
            rec["condition_number_avg"][ok],
            "-",
            lw=1.5,
            color="tab:blue",
            label="condition number",
        )
        ax.set_title(run.label, fontsize="medium")
        ax.set_xlabel("iteration")
        if j == 0:
            ax.set_ylabel("condition number", color="tab:blue")
        twin = ax.twinx()
        loss_ok = _finite(run.steps["loss"])
        twin.plot(
            run.steps["iteration"][loss_ok],
            run.steps["loss"][loss_ok],
            lw=0.8,
            color="tab:red",
            alpha=0.7,
        )
        twin.set_ylim(bottom=0)
        twin.tick_params(axis="y", colors="tab:red")
        if j == len(cols) - 1:
            twin.set_ylabel("mini-batch loss", color="tab:red")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if (i, j) not in placed:
                axes[i, j].set_visible(False)
    fig.suptitle("Condition number of the mini-batch Fisher (blue, log) and loss (red)")
    return _save(fig, path)


def plot_density(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    xlabel: str = "eigenvalue",
    title: str = "Spectral density (stochastic Lanczos quadrature)",
    logy: bool = True,
) -> Path:
    """Spectral densities: name -> ``(grid, density)`` arrays of the same length.

    Returns:
        ``path``.
    """
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    for name, (grid, dens) in curves.items():
        g, d = np.asarray(grid), np.asarray(dens)
        ax.plot(g, np.maximum(d, 1e-12) if logy else d, lw=1.3, label=name)
    if logy:
        ax.set_yscale("log")
        top = max(float(np.max(np.asarray(d))) for _, d in curves.values())
        ax.set_ylim(max(top * 1e-7, 1e-12), top * 3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (integrates to 1)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_landscape_1d(
    alphas: np.ndarray,
    curves: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str = "Loss along directions",
) -> Path:
    """1-D loss curves: label -> losses ``(len(alphas),)`` (dashed when the label starts with "random").

    Returns:
        ``path``.
    """
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    for name, losses in curves.items():
        style = "--" if name.startswith("random") else "-"
        ax.plot(np.asarray(alphas), np.asarray(losses), style, lw=1.4, label=name)
    ax.axvline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("step alpha along the unit direction (theta + alpha d)")
    ax.set_ylabel("mean loss")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_landscape_2d(
    alphas: np.ndarray,
    betas: np.ndarray,
    losses: np.ndarray,
    path: str | Path,
    *,
    labels: tuple[str, str] = ("d1", "d2"),
    title: str = "Loss on a plane",
) -> Path:
    """Contour plot of ``losses`` ``(len(alphas), len(betas))``.

    Returns:
        ``path``.
    """
    fig = _figure(6, 5)
    ax = fig.subplots()
    z = np.asarray(losses)
    levels = np.geomspace(max(float(z.min()), 1e-8), float(z.max()), 20)
    cs = ax.contourf(
        np.asarray(alphas), np.asarray(betas), z.T, levels=levels, cmap="viridis"
    )
    ax.contour(
        np.asarray(alphas),
        np.asarray(betas),
        z.T,
        levels=levels,
        colors="k",
        linewidths=0.3,
    )
    fig.colorbar(cs, ax=ax, label="mean loss (geometric levels)", format="%.3g")
    ax.plot([0], [0], "r*", ms=10, label="trained weights")
    ax.set_xlabel(f"alpha along {labels[0]}")
    ax.set_ylabel(f"beta along {labels[1]}")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper right")
    return _save(fig, path)


def plot_representations(
    rows: Mapping[str, Mapping[str, float]],
    path: str | Path,
    metrics: Sequence[str] = ("mv_rel_err", "solve_rel_err", "eig_overlap_err"),
    *,
    title: str = "Each representation against the dense Fisher",
) -> Path:
    """Grouped bars: for each representation, its errors against the dense Fisher.

    Args:
        rows: representation name -> metric -> value.
        path: the PNG.
        metrics: which metrics (log scale, floored at 1e-9).
        title: the figure's title.

    Returns:
        ``path``.
    """
    names = [n for n in rows if n != "PMatDense"]
    fig = _figure(max(7, 1.2 * len(names) + 2), 4.5)
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        raw = [float(rows[n].get(metric, math.nan)) for n in names]
        vals = [max(v, 1e-9) for v in raw]
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, vals, width, label=metric)
        for x, v in zip(xs, raw, strict=True):
            if not math.isfinite(v) or v <= 1e-9:  # invisible bar: say what it is
                text = "n/a" if not math.isfinite(v) else "0"
                ax.text(x, 1.5e-9, text, ha="center", va="bottom", fontsize="small")
    ax.set_xticks(
        [j + width * (len(metrics) - 1) / 2 for j in range(len(names))],
        names,
        rotation=20,
    )
    ax.set_yscale("log")
    ax.set_ylim(1e-9, 10)
    ax.set_ylabel("relative error vs PMatDense (floor 1e-9)")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=len(metrics), loc="upper left")
    return _save(fig, path)


def plot_eigenvalues(
    spectra: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str = "Eigenvalues by rank",
) -> Path:
    """Eigenvalues against their rank (log-log): name -> values ``(m,)``, descending.

    Non-positive values are left out (log scale).

    Returns:
        ``path``.
    """
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    markers = ["o", "x", "s", "^", "d"]
    for i, (name, vals) in enumerate(spectra.items()):
        v = np.asarray(vals, dtype=np.float64)
        ranks = np.arange(1, v.size + 1)
        ok = np.isfinite(v) & (v > 0)
        if ok.sum() > 20:
            ax.loglog(ranks[ok], v[ok], "-", lw=1.3, label=name)
        else:
            marker = markers[i % len(markers)]
            ax.loglog(ranks[ok], v[ok], marker, ms=7, mfc="none", mew=1.5, label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, path)
