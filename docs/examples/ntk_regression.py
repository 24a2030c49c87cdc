"""NTK regression on the digits: the linearised network against the trained one.

    python docs/examples/ntk_regression.py [--quick] [--out DIR]

A one-hidden-layer MLP (10 outputs) is fitted to one-hot targets by full-batch
gradient descent on the mean squared loss ``(1/2n) sum_i ||f(x_i) - y_i||^2``.
:class:`nnfim.NTKRegressor` predicts, from the NTK at initialisation alone,
what the linearised network gives after the same training time
``t = lr x steps``; the script prints, at several times, the test accuracy of
both and the relative difference of their test outputs, then the kernel
regression at convergence. Writes ``results.json`` (and ``ntk.png`` with
matplotlib) into ``--out`` (default ``runs/examples/ntk_regression``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import pyplot, write_results
from torch import nn

from nnfim import NTKRegressor
from nnfim.demo import load_digits_data


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(1) == y).double().mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds")
    parser.add_argument("--out", default="runs/examples/ntk_regression")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    n_train, width, steps = (60, 64, 100) if args.quick else (300, 1024, 1000)
    x, labels, source = load_digits_data(args.seed)
    x, labels = x.double(), labels
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x), generator=gen)
    tr, te = order[:n_train], order[n_train : n_train + 500]
    x_tr, x_te, y_tr, y_te = x[tr], x[te], labels[tr], labels[te]
    targets = nn.functional.one_hot(y_tr, 10).double()

    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10)
    ).double()
    init = copy.deepcopy(model)
    reg = NTKRegressor(model, regul=0.0).fit([(x_tr, targets)])
    assert reg.kernel is not None
    top = float(reg.kernel.eigvalsh()[-1])
    lr = 1.0 / (top / n_train)  # stable for the linearised dynamics (< 2 / max)
    print(
        f"data: {source}; {n_train} training images, {len(te)} test images; "
        f"MLP 64-{width}-10 ({sum(p.numel() for p in model.parameters())} parameters); "
        f"lr {lr:.3g}"
    )

    checkpoints = sorted({steps // 20, steps // 4, steps})
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rows = []
    print(f"{'steps':>6} {'time':>8} {'acc net':>8} {'acc lin':>8} {'rel. diff':>9}")
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = 0.5 * ((model(x_tr) - targets) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        if step in checkpoints:
            t = lr * step
            with torch.no_grad():
                net = model(x_te)
            lin = reg.predict([x_te], time=t)
            diff = float(
                torch.linalg.vector_norm(net - lin) / torch.linalg.vector_norm(lin)
            )
            row = {
                "steps": step,
                "time": t,
                "train_loss": float(loss.detach()),
                "acc_net": accuracy(net, y_te),
                "acc_linearised": accuracy(lin, y_te),
                "relative_difference": diff,
            }
            rows.append(row)
            print(
                f"{step:>6} {t:>8.3g} {row['acc_net']:>8.3f} "
                f"{row['acc_linearised']:>8.3f} {diff:>9.3g}"
            )
    final = reg.predict([x_te])
    ridge = NTKRegressor(init, regul=1e-3 * top)  # the weights before training
    ridged = ridge.fit([(x_tr, targets)]).predict([x_te])
    summary = {
        "converged_acc": accuracy(final, y_te),
        "ridge_acc": accuracy(ridged, y_te),
        "ridge": 1e-3 * top,
    }
    print(
        f"kernel regression at convergence: test accuracy {summary['converged_acc']:.3f}; "
        f"with ridge {summary['ridge']:.3g}: {summary['ridge_acc']:.3f}"
    )

    out = Path(args.out)
    if not write_results(out, {"checkpoints": rows, **summary, "lr": lr}):
        return 1
    plt = pyplot()
    if plt is None:
        print(f"wrote {out / 'results.json'} (no plot: matplotlib not installed)")
        return 0
    fig, ax = plt.subplots(figsize=(5, 3.5))
    with torch.no_grad():
        net = model(x_te)
    lin = reg.predict([x_te], time=lr * steps)
    ax.scatter(lin.reshape(-1).numpy(), net.reshape(-1).numpy(), s=3, alpha=0.3)
    ax.set_xlabel(f"linearised network, t = {lr * steps:.3g} (NTK)")
    ax.set_ylabel(f"trained network, {steps} steps")
    ax.set_title("test outputs, all 10 classes", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "ntk.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'results.json'} and {out / 'ntk.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
