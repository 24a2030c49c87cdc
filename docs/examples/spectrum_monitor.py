"""Watch the Fisher while training: TrainingMonitor in a plain PyTorch loop.

    python docs/examples/spectrum_monitor.py [--quick] [--out DIR]

Trains the built-in MLP on the digits images with SGD, records every
eigenvalue of each mini-batch Fisher (Gram dual) and its condition number,
then computes the Hessian's top eigenvalues (Lanczos) and spectral density
(SLQ) at the end. Writes ``run.npz``/``run.json`` (and ``run.mat`` with
scipy), ``run.png`` and ``density.png`` (with matplotlib) under ``--out``
(default ``runs/examples/spectrum_monitor``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from nnfim.analysis import Hessian, fim_spectrum
from nnfim.apps import TrainingMonitor, load_run
from nnfim.data import batches, load_dataset
from nnfim.linalg import lanczos, slq
from nnfim.models import build_model
from nnfim.pmat import PMatImplicit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes")
    parser.add_argument("--out", default="runs/examples/spectrum_monitor")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: more threads only stall on a busy machine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    epochs, bs = (1, 64) if args.quick else (5, 32)

    data = load_dataset("digits", seed=0)
    model = build_model("mlp", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = TrainingMonitor(
        every=2, max_examples=32, metadata={"lr": 0.1, "batch_size": bs}
    )
    gen = torch.Generator().manual_seed(0)
    test = batches(data.x_test, data.y_test, 512)
    for _ in range(epochs):
        for xb, yb in batches(data.x_train, data.y_train, bs, gen):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            monitor.step(model, (xb, yb), loss=loss, optimizer=opt)  # after backward
            opt.step()
        row = monitor.epoch(model, test=test)
        print(f"epoch {row['epoch']}: test accuracy {row['test_acc']:.1%}")
    monitor.save(out)
    run = load_run(out)
    cond = run.records["condition_number"]
    print(
        f"{len(cond)} spectra recorded; condition number {cond[0]:.3g} -> {cond[-1]:.3g}"
    )

    # The trained model: every eigenvalue of the Fisher of 64 examples, and the
    # Hessian's extreme eigenvalues and density, all matrix-free.
    loader = batches(data.x_train[:256], data.y_train[:256], 128)
    spec = fim_spectrum(model, [(data.x_train[:64], data.y_train[:64])])
    print(
        f"Fisher of 64 examples: rank {spec.rank}, top eigenvalue {float(spec.eigenvalues[0]):.4g}"
    )
    hess = Hessian(model, loader, PMatImplicit)
    vals, _ = lanczos(hess, 3, which="both", n_iter=30)
    print(f"Hessian: smallest {vals[:3].tolist()}, largest {vals[3:].tolist()}")
    dens = slq(hess, n_probes=3 if args.quick else 8, n_iter=20 if args.quick else 40)

    from nnfim.apps.plot import plot_density, plot_run  # matplotlib: imported on use

    try:
        plot_run(run, out / "run.png")
    except ImportError:  # matplotlib is optional
        print("matplotlib not installed: no plots")
        return
    lo, hi = float(dens.nodes.min()), float(dens.nodes.max())
    grid = torch.linspace(
        lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 400, dtype=torch.float64
    )
    plot_density(
        {"Hessian": (grid.numpy(), dens.density(grid, (hi - lo) / 100).numpy())},
        out / "density.png",
    )
    print(f"wrote {out}/run.png, {out}/density.png")


if __name__ == "__main__":
    main()
