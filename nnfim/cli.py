"""The ``nnfim`` command: track, spectrum, landscape, compare, plot, demo.

Every command writes its outputs into a temporary directory next to ``--out``
and renames it into place at the end, so a failure leaves nothing
half-written. Errors are one line on stderr and a non-zero exit status
(1: the command failed on its input, 2: bad usage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnfim.apps.monitor import Run, TrainingMonitor, load_run, save_run
from nnfim.data import DATASETS, Dataset, batches, load_dataset
from nnfim.models import MODELS, build_model

__all__ = ["CLIError", "main"]


class CLIError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- output directories -------------------------------------------------------
@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` on success only."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"cannot write to {out}: it exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise CLIError(f"cannot write to {out}: {err.strerror or err}") from err
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- progress -------------------------------------------------------------------
class _Progress:
    """tqdm on stderr when installed and wanted; otherwise silent."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- runs: training and loading -------------------------------------------------
def _check_names(model: str, dataset: str) -> None:
    if model not in MODELS:
        raise CLIError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}", 2)
    if dataset not in DATASETS:
        raise CLIError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}", 2
        )


def track(
    out: Path,
    *,
    model_name: str = "mlp",
    dataset: str = "digits",
    lr: float = 0.05,
    batch_size: int = 64,
    epochs: int = 5,
    seed: int = 0,
    every: int = 1,
    max_examples: int | None = 64,
    optimizer: str = "sgd",
    progress: bool = True,
    label: str | None = None,
) -> Run:
    """Train a built-in model with the :class:`TrainingMonitor`; write the run to ``out``.

    Writes ``run.npz``, ``run.json`` (``run.mat`` with scipy) and ``model.pt``
    (the trained weights, a plain state dict) into ``out``, an existing directory.
    """
    _check_names(model_name, dataset)
    if lr <= 0 or batch_size < 1 or epochs < 1 or every < 1:
        raise CLIError(
            "lr must be positive and batch size, epochs and every at least 1", 2
        )
    data = load_dataset(dataset, seed)
    model = build_model(model_name, data.n_classes, seed)
    data = data.to(next(model.parameters()).dtype)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise CLIError(f"unknown optimizer {optimizer!r}; choose sgd or adam", 2)
    meta = {
        "model": model_name,
        "dataset": dataset,
        "source": data.source,
        "lr": lr,
        "batch_size": batch_size,
        "epochs": epochs,
        "seed": seed,
        "optimizer": optimizer,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        "label": label or f"{model_name} lr={lr:g} bs={batch_size}",
    }
    monitor = TrainingMonitor(every=every, max_examples=max_examples, metadata=meta)
    gen = torch.Generator().manual_seed(seed)
    test = batches(data.x_test, data.y_test, 512)
    steps_per_epoch = math.ceil(len(data.x_train) / batch_size)
    bar = _Progress(epochs * steps_per_epoch, f"track {meta['label']}", progress)
    try:
        for _ in range(epochs):
            model.train()
            for xb, yb in batches(data.x_train, data.y_train, batch_size, gen):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                if not torch.isfinite(loss):
                    raise CLIError(
                        f"training diverged (loss {float(loss.detach())}) at lr={lr:g}: "
                        "lower the learning rate"
                    )
                monitor.step(model, (xb, yb), loss=loss, optimizer=opt)
                opt.step()
                bar.update(loss=f"{float(loss.detach()):.3f}")
            monitor.epoch(
                model,
                train=batches(data.x_train, data.y_train, 512),
                test=test,
            )
    finally:
        bar.close()
    run = monitor.run()
    save_run(run, out)
    torch.save(model.state_dict(), out / "model.pt")
    return run


def _check_run(run_dir: Path) -> None:
    try:
        load_run(run_dir)
    except ValueError as err:
        raise CLIError(str(err)) from err
    if not (run_dir / "model.pt").is_file():
        raise CLIError(f"{run_dir}: no model.pt (was it written by `nnfim track`?)")


def load_model(run_dir: Path) -> tuple[nn.Module, Run, Dataset]:
    """The trained model of a ``track`` run, its run and its data."""
    try:
        run = load_run(run_dir)
    except ValueError as err:
        raise CLIError(str(err)) from err
    meta = run.meta
    name, dataset, seed = meta.get("model"), meta.get("dataset"), meta.get("seed")
    if (
        not isinstance(name, str)
        or not isinstance(dataset, str)
        or not isinstance(seed, int)
    ):
        raise CLIError(
            f"{run_dir}: the run does not say which built-in model it trained"
        )
    _check_names(name, dataset)
    weights = run_dir / "model.pt"
    if not weights.is_file():
        raise CLIError(f"{run_dir}: no model.pt (was it written by `nnfim track`?)")
    data = load_dataset(dataset, seed)
    model = build_model(name, data.n_classes, seed)
    data = data.to(next(model.parameters()).dtype)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # torch raises several types for bad files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CLIError(f"{weights}: unreadable model weights ({first})") from err
    model.eval()
    return model, run, data


# -- analyses ---------------------------------------------------------------------
def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def spectrum(
    run_dir: Path,
    out: Path,
    *,
    n_examples: int = 256,
    k: int = 10,
    probes: int = 8,
    iters: int = 40,
    seed: int = 0,
) -> dict[str, Any]:
    """Hessian and GGN spectra (Lanczos, SLQ), the Fisher's Gram-dual spectrum, estimates."""
    from nnfim.analysis import (
        GGN,
        Hessian,
        fim_spectrum,
        gradient_statistics,
        weight_norms,
    )
    from nnfim.linalg import frobenius_norm_estimate, hutchpp_trace, lanczos, slq
    from nnfim.pmat import PMatImplicit

    model, _, data = load_model(run_dir)
    loader = batches(data.x_train[:n_examples], data.y_train[:n_examples], 128)
    hess = Hessian(model, loader, PMatImplicit)
    ggn = GGN(model, loader, PMatImplicit)
    result: dict[str, Any] = {"n_examples": min(n_examples, len(data.x_train))}
    densities = {}
    for name, mat in (("Hessian", hess), ("GGN (= Fisher)", ggn)):
        vals, _ = lanczos(
            mat,
            k,
            which="both",
            n_iter=min(mat.layer_collection.numel(), max(3 * k, iters)),
            seed=seed,
        )
        dens = slq(mat, n_probes=probes, n_iter=iters, seed=seed)
        densities[name] = dens
        result[name] = {
            "top": vals[k:].flip(0).tolist(),
            "bottom": vals[:k].tolist(),
            "trace_slq": float(dens.trace()),
            "trace_hutchpp": float(hutchpp_trace(mat, 3 * probes, seed=seed)),
            "frobenius_estimate": float(
                frobenius_norm_estimate(mat, probes, seed=seed)
            ),
        }
    gram = fim_spectrum(model, loader)
    result["Fisher Gram dual"] = {
        "eigenvalues": gram.nonzero.tolist(),
        "rank": gram.rank,
        "condition_number": gram.condition_number,
        "n_params": gram.n_params,
    }
    stats = gradient_statistics(model, loader)
    result["gradients"] = {
        "mean_norm": stats.mean_norm,
        "noise": stats.noise,
        "snr": stats.snr,
    }
    result["weights"] = weight_norms(model)
    arrays: dict[str, Any] = {"gram_eigenvalues": gram.eigenvalues.numpy()}
    for i, d in enumerate(densities.values()):
        arrays[f"slq_nodes_{i}"] = d.nodes.numpy()
        arrays[f"slq_weights_{i}"] = d.weights.numpy()
    np.savez(out / "spectrum.npz", **arrays)
    (out / "spectrum.json").write_text(json.dumps(result, indent=2))
    if _has_matplotlib():
        from nnfim.apps.plot import plot_density, plot_eigenvalues

        lo = min(float(d.nodes[d.weights > 0].min()) for d in densities.values())
        hi = max(float(d.nodes[d.weights > 0].max()) for d in densities.values())
        pad = 0.05 * (hi - lo)
        grid = torch.linspace(lo - pad, hi + pad, 600, dtype=torch.float64)
        sigma = (hi - lo) / 150
        curves = {
            n: (grid.numpy(), d.density(grid, sigma).numpy())
            for n, d in densities.items()
        }
        plot_density(
            curves,
            out / "density.png",
            title=f"Spectral density (SLQ, {probes} probes x {iters} steps, {result['n_examples']} examples)",
        )
        plot_eigenvalues(
            {
                "Fisher, all (Gram dual)": gram.nonzero.numpy(),
                "GGN top (Lanczos)": np.asarray(result["GGN (= Fisher)"]["top"]),
                "Hessian top (Lanczos)": np.asarray(result["Hessian"]["top"]),
                "-(Hessian most negative)": -np.asarray(result["Hessian"]["bottom"]),
            },
            out / "eigenvalues.png",
            title=f"Eigenvalues by rank ({result['n_examples']} training examples)",
        )
    return result


def landscape(
    run_dir: Path,
    out: Path,
    *,
    n_examples: int = 512,
    points: int = 25,
    grid: int = 15,
    radius: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss along the top Hessian eigenvectors against random directions of the same norm."""
    from nnfim.analysis import (
        Hessian,
        landscape_1d,
        landscape_2d,
        random_direction,
        top_eigenvectors,
    )
    from nnfim.pmat import PMatImplicit

    model, _, data = load_model(run_dir)
    loader = batches(data.x_train[:n_examples], data.y_train[:n_examples], 256)
    hess = Hessian(model, loader, PMatImplicit)
    vals, vecs = top_eigenvectors(
        hess, 2, n_iter=min(hess.layer_collection.numel(), 40), seed=seed
    )
    rand = [random_direction(vecs[0], seed=seed + 1 + i) for i in range(2)]
    alphas = torch.linspace(-radius, radius, points, dtype=torch.float64)
    curves = {
        f"Hessian eigvec 1 (lambda={float(vals[0]):.3g})": landscape_1d(
            model, loader, vecs[0], alphas
        ),
        f"Hessian eigvec 2 (lambda={float(vals[1]):.3g})": landscape_1d(
            model, loader, vecs[1], alphas
        ),
        "random 1 (same norm)": landscape_1d(model, loader, rand[0], alphas),
        "random 2 (same norm)": landscape_1d(model, loader, rand[1], alphas),
    }
    g = torch.linspace(-radius, radius, grid, dtype=torch.float64)
    surface = landscape_2d(model, loader, vecs[0], vecs[1], g, g)
    np.savez(
        out / "landscape.npz",
        alphas=alphas.numpy(),
        curves=np.stack([c.numpy() for c in curves.values()]),
        grid=g.numpy(),
        surface=surface.numpy(),
        eigenvalues=vals.numpy(),
    )
    result = {
        "eigenvalues": vals.tolist(),
        "labels": list(curves),
        "radius": radius,
        "loss_at_0": float(next(iter(curves.values()))[points // 2]),
        "loss_at_radius": {k: float(v[-1]) for k, v in curves.items()},
    }
    (out / "landscape.json").write_text(json.dumps(result, indent=2))
    if _has_matplotlib():
        from nnfim.apps.plot import plot_landscape_1d, plot_landscape_2d

        plot_landscape_1d(
            alphas.numpy(),
            {k: v.numpy() for k, v in curves.items()},
            out / "landscape_1d.png",
            title="Loss along the top Hessian eigenvectors vs random directions (unit norm)",
        )
        plot_landscape_2d(
            g.numpy(),
            g.numpy(),
            surface.numpy(),
            out / "landscape_2d.png",
            labels=("Hessian eigvec 1", "Hessian eigvec 2"),
            title="Loss on the plane of the top two Hessian eigenvectors",
        )
    return result


def compare(
    run_dir: Path, out: Path, *, n_examples: int = 200, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Representation quality on the trained model (see :func:`~nnfim.apps.compare.compare_representations`)."""
    from nnfim.apps.compare import compare_representations

    model, _, data = load_model(run_dir)
    loader = batches(data.x_train[:n_examples], data.y_train[:n_examples], 100)
    rows = compare_representations(model, loader, seed=seed)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| representation | build (s) | mv rel. err | solve rel. err (regul 1e-2) | top-10 eigvec overlap | top eig rel. err | trace rel. err |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['build_seconds']:.3f} | {r['mv_rel_err']:.2e} | "
            f"{r['solve_rel_err']:.2e} | {r['eig_overlap']:.4f} | "
            f"{r['top_eig_rel_err']:.2e} | {r['trace_rel_err']:.2e} |"
        )
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    if _has_matplotlib():
        from nnfim.apps.plot import plot_representations

        plot_representations(
            rows,
            out / "representations.png",
            title=f"Each representation against the dense Fisher ({len(loader)} "
            f"batches, {min(n_examples, len(data.x_train))} examples; solve: regul 1e-2; "
            "overlap: top-10 eigenvectors)",
        )
    return rows


def plot(runs: Sequence[Path], out: Path) -> list[str]:
    """``run.png`` for one run; one per run plus ``runs.png`` side by side for several."""
    if not _has_matplotlib():
        raise CLIError("nnfim plot needs matplotlib: pip install 'nnfim[plot]'")
    from nnfim.apps.plot import plot_run, plot_runs

    loaded = []
    for r in runs:
        try:
            loaded.append(load_run(r))
        except ValueError as err:
            raise CLIError(str(err)) from err
    written = []
    for i, run in enumerate(loaded):
        name = "run.png" if len(loaded) == 1 else f"run_{i}_{_slug(run.label)}.png"
        plot_run(run, out / name)
        written.append(name)
    if len(loaded) > 1:
        plot_runs(loaded, out / "runs.png")
        written.append("runs.png")
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


# -- demo -------------------------------------------------------------------------
#: demo settings: the default, --quick (seconds to a minute) and --tiny (tests)
DEMO_LEVELS: dict[str, dict[str, Any]] = {
    "full": {
        "epochs": 5,
        "bs": (32, 128),
        "lrs": (0.03, 0.3),
        "every": 2,
        "spectrum": (256, 8, 40),
        "landscape": (512, 25, 15),
        "compare": 200,
    },
    "quick": {
        "epochs": 2,
        "bs": (32, 128),
        "lrs": (0.03, 0.3),
        "every": 3,
        "spectrum": (128, 4, 20),
        "landscape": (256, 13, 9),
        "compare": 100,
    },
    "tiny": {
        "epochs": 1,
        "bs": (256, 512),
        "lrs": (0.1,),
        "every": 3,
        "spectrum": (16, 2, 6),
        "landscape": (16, 3, 3),
        "compare": 8,
    },
}


def demo(
    out: Path,
    *,
    level: str = "full",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> str:
    """Everything on defaults: a grid of runs, spectra, landscape, comparison, report.

    ``level`` is ``"full"``, ``"quick"`` or ``"tiny"`` (see ``DEMO_LEVELS``).
    """
    cfg = DEMO_LEVELS[level]
    start = time.perf_counter()
    runs: dict[str, Run] = {}
    for bs in cfg["bs"]:
        for lr in cfg["lrs"]:
            name = f"mlp_lr{lr:g}_bs{bs}"
            (out / name).mkdir()
            runs[name] = track(
                out / name,
                lr=lr,
                batch_size=bs,
                epochs=cfg["epochs"],
                every=cfg["every"] if bs < 100 else 1,
                max_examples=48,
                progress=progress,
            )
            acc = runs[name].epochs["test_acc"][-1]
            log(f"trained {name}: test accuracy {acc:.1%}")
    best = max(runs, key=lambda n: runs[n].epochs["test_acc"][-1])
    best_dir = out / best
    (out / "spectrum").mkdir()
    n_spec, probes, iters = cfg["spectrum"]
    spec = spectrum(
        best_dir, out / "spectrum", n_examples=n_spec, probes=probes, iters=iters
    )
    log("spectrum done")
    (out / "landscape").mkdir()
    n_land, points, grid = cfg["landscape"]
    land = landscape(
        best_dir, out / "landscape", n_examples=n_land, points=points, grid=grid
    )
    log("landscape done")
    (out / "compare").mkdir()
    rows = compare(best_dir, out / "compare", n_examples=cfg["compare"])
    log("compare done")
    plots: list[str] = []
    if _has_matplotlib():
        (out / "plots").mkdir()
        plots = [f"plots/{p}" for p in plot([out / n for n in runs], out / "plots")]
    seconds = time.perf_counter() - start
    text = _report(out, runs, best, spec, land, rows, plots, seconds, level)
    (out / "report.md").write_text(text)
    return text


def _report(
    out: Path,
    runs: dict[str, Run],
    best: str,
    spec: dict[str, Any],
    land: dict[str, Any],
    rows: dict[str, dict[str, float]],
    plots: list[str],
    seconds: float,
    level: str,
) -> str:
    first = runs[best].meta
    lines = [
        "# nnfim demo",
        "",
        f"Data: {first['source']} ({first['n_train']} training, {first['n_test']} test "
        f"images 8x8); model: MLP 64-32-10 ({first['n_params']} parameters), plain SGD, "
        f"{first['epochs']} epochs{'' if level == 'full' else f' (--{level})'}. Total time {seconds:.0f} s.",
        "",
        "## Training runs (learning rate x batch size), with the TrainingMonitor",
        "",
        "Every recorded step computes all eigenvalues of the Fisher of (the first 48 "
        "examples of) the mini-batch through its Gram dual (480 eigenvalues for 10 "
        "classes), and their condition number over the nonzero ones.",
        "",
        "| run | final train loss | test accuracy | median condition number | monitor cost per record (ms) | run |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        rec = run.records
        lines.append(
            f"| {run.label} | {run.epochs['train_loss'][-1]:.3f} | "
            f"{run.epochs['test_acc'][-1]:.1%} | "
            f"{np.nanmedian(rec['condition_number']):.3g} | "
            f"{1000 * np.median(rec['seconds']):.1f} | [{name}/]({name}/run.json) |"
        )
    lines += ["", f"Analyses below use the best run, `{best}`.", ""]
    lines += [f"![{p}]({p})" for p in plots if p.endswith("runs.png")]
    lines += [""]
    lines += [f"![{p}]({p})" for p in plots if not p.endswith("runs.png")]
    h, g, gram = spec["Hessian"], spec["GGN (= Fisher)"], spec["Fisher Gram dual"]
    lines += [
        "",
        f"## Spectra ({spec['n_examples']} training examples)",
        "",
        "| matrix | top eigenvalues | smallest | trace (SLQ / Hutch++) | Frobenius (est.) |",
        "|---|---|---|---|---|",
        f"| Hessian | {', '.join(f'{v:.3g}' for v in h['top'][:4])} | {h['bottom'][0]:.3g} | {h['trace_slq']:.3g} / {h['trace_hutchpp']:.3g} | {h['frobenius_estimate']:.3g} |",
        f"| GGN (= Fisher) | {', '.join(f'{v:.3g}' for v in g['top'][:4])} | {g['bottom'][0]:.3g} | {g['trace_slq']:.3g} / {g['trace_hutchpp']:.3g} | {g['frobenius_estimate']:.3g} |",
        "",
        f"Fisher through its Gram dual: rank {gram['rank']} of {gram['n_params']} parameters, "
        f"top eigenvalue {gram['eigenvalues'][0]:.4g}, condition number (nonzero) "
        f"{gram['condition_number']:.3g}. Gradient noise (trace of the per-example "
        f"gradient covariance) {spec['gradients']['noise']:.3g}, mean gradient norm "
        f"{spec['gradients']['mean_norm']:.3g}; weights L2 {spec['weights']['l2']:.3g}, "
        f"Linf {spec['weights']['linf']:.3g}.",
        "",
        "![spectrum/density.png](spectrum/density.png)",
        "",
        "![spectrum/eigenvalues.png](spectrum/eigenvalues.png)",
        "",
        "## Loss landscape",
        "",
        f"Loss at the trained weights {land['loss_at_0']:.4f}; at distance {land['radius']:g}: "
        + "; ".join(f"{k}: {v:.4f}" for k, v in land["loss_at_radius"].items())
        + ".",
        "",
        "![landscape/landscape_1d.png](landscape/landscape_1d.png)",
        "",
        "![landscape/landscape_2d.png](landscape/landscape_2d.png)",
        "",
        "## Representations against the dense Fisher",
        "",
        (out / "compare" / "compare.md").read_text(),
        "![compare/representations.png](compare/representations.png)",
        "",
    ]
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnfim", description="Watch and analyse the Fisher of small networks."
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the built-in models are small, and on a "
        "busy machine several OpenMP threads stall each other)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "track", help="train a built-in model, recording the Fisher spectrum"
    )
    t.add_argument("--model", default="mlp", help=f"one of {', '.join(MODELS)}")
    t.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)}")
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--every", type=int, default=1, help="record every N steps")
    t.add_argument(
        "--max-examples",
        type=int,
        default=64,
        help="examples of each batch in the spectrum",
    )
    t.add_argument("--optimizer", default="sgd", help="sgd or adam")
    t.add_argument("--out", default="runs/track")
    t.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("spectrum", help="Hessian/GGN spectra of a tracked run")
    s.add_argument("run")
    s.add_argument("--out", help="default: RUN/spectrum")
    s.add_argument("--n-examples", type=int, default=256)
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--probes", type=int, default=8)
    s.add_argument("--iters", type=int, default=40)

    la = sub.add_parser(
        "landscape", help="loss along top Hessian eigenvectors vs random"
    )
    la.add_argument("run")
    la.add_argument("--out", help="default: RUN/landscape")
    la.add_argument("--n-examples", type=int, default=512)
    la.add_argument("--points", type=int, default=25)
    la.add_argument("--grid", type=int, default=15)
    la.add_argument("--radius", type=float, default=1.0)

    c = sub.add_parser("compare", help="each representation against the dense Fisher")
    c.add_argument("run")
    c.add_argument("--out", help="default: RUN/compare")
    c.add_argument("--n-examples", type=int, default=200)

    pl = sub.add_parser("plot", help="plot one run, or several side by side")
    pl.add_argument("runs", nargs="+")
    pl.add_argument(
        "--out", help="default: RUN/plots for one run, runs/plots for several"
    )

    d = sub.add_parser("demo", help="all of the above on defaults, with report.md")
    d.add_argument("--out", default="runs/demo")
    d.add_argument(
        "--quick", action="store_true", help="smaller settings (under a minute)"
    )
    d.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
    d.add_argument("--no-progress", action="store_true")
    return p


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(
                f"--{name.replace('_', '-')} must be at least 1, got {value}", 2
            )


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "track":
        _check_names(args.model, args.dataset)
        _positive(args, "batch_size", "epochs", "every", "max_examples")
        with atomic_dir(Path(args.out)) as tmp:
            run = track(
                tmp,
                model_name=args.model,
                dataset=args.dataset,
                lr=args.lr,
                batch_size=args.batch_size,
                epochs=args.epochs,
                seed=args.seed,
                every=args.every,
                max_examples=args.max_examples,
                optimizer=args.optimizer,
                progress=not args.no_progress,
            )
            if _has_matplotlib():
                from nnfim.apps.plot import plot_run

                plot_run(run, tmp / "run.png")
        print(
            f"wrote {args.out}: test accuracy {run.epochs['test_acc'][-1]:.1%}, {len(run.records['iteration'])} spectra recorded"
        )
        return 0
    if cmd in ("spectrum", "landscape", "compare"):
        run_dir = Path(args.run)
        _check_run(run_dir)  # before anything is created next to it
        out = Path(args.out) if args.out else run_dir / cmd
        if cmd == "spectrum":
            _positive(args, "n_examples", "k", "probes", "iters")
            with atomic_dir(out) as tmp:
                result = spectrum(
                    run_dir,
                    tmp,
                    n_examples=args.n_examples,
                    k=args.k,
                    probes=args.probes,
                    iters=args.iters,
                )
            print(
                f"wrote {out}: Hessian top eigenvalue {result['Hessian']['top'][0]:.4g}, Fisher rank {result['Fisher Gram dual']['rank']}"
            )
        elif cmd == "landscape":
            _positive(args, "n_examples", "points", "grid")
            with atomic_dir(out) as tmp:
                landscape(
                    run_dir,
                    tmp,
                    n_examples=args.n_examples,
                    points=args.points,
                    grid=args.grid,
                    radius=args.radius,
                )
            print(f"wrote {out}")
        else:
            _positive(args, "n_examples")
            with atomic_dir(out) as tmp:
                compare(run_dir, tmp, n_examples=args.n_examples)
            print(f"wrote {out}")
        return 0
    if cmd == "plot":
        runs = [Path(r) for r in args.runs]
        out = (
            Path(args.out)
            if args.out
            else (runs[0] / "plots" if len(runs) == 1 else Path("runs/plots"))
        )
        with atomic_dir(out) as tmp:
            written = plot(runs, tmp)
        print(f"wrote {', '.join(str(out / w) for w in written)}")
        return 0
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        text = demo(
            tmp,
            level="tiny" if args.tiny else ("quick" if args.quick else "full"),
            progress=not args.no_progress,
            log=lambda m: print(m, file=sys.stderr),
        )
    print(text)
    print(f"wrote {out / 'report.md'}")
    return 0


def _say(command: str, err: BaseException) -> None:
    """The error as exactly one line on stderr."""
    text = " ".join(str(err).split()) or type(err).__name__
    print(f"nnfim {command}: error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nnfim`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}", 2)
        torch.set_num_threads(args.threads)
        return _run(args)
    except CLIError as err:
        _say(args.command, err)
        return err.status
    except (ValueError, OSError) as err:
        _say(args.command, err)
        return 1
    finally:
        torch.set_num_threads(threads)  # main() may be called from Python


if __name__ == "__main__":
    raise SystemExit(main())
