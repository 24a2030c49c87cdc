"""EWC on two digits tasks: the images, then the same images with permuted pixels.

An MLP learns task A (digits), then task B (the same digits, pixels permuted
by a fixed permutation) with plain fine-tuning or with an EWC penalty whose
Fisher (of task A) is held in one representation or another: changing
``representation=`` is the only difference between the EWC runs.

    python docs/examples/ewc_digits.py [--quick] [--out DIR]

prints the test accuracies on both tasks after learning B and writes
``results.json`` (and ``accuracy.png`` when matplotlib is installed) into
``--out`` (default ``runs/examples/ewc_digits``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import pyplot, write_results
from torch import nn

from nnfim import (
    EWC,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatKFAC,
)
from nnfim.demo import batches, load_digits_data

REPRESENTATIONS = {
    "PMatDiag": PMatDiag,
    "PMatKFAC": PMatKFAC,
    "PMatEKFAC": PMatEKFAC,
    "PMatBlockDiag": PMatBlockDiag,
    "PMatDense": PMatDense,
}


def make_tasks(seed: int):
    """Train/test splits of task A (digits) and task B (permuted pixels)."""
    x, y, source = load_digits_data(seed)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    train, test = order[:1300], order[1300:]
    perm = torch.randperm(x.shape[1], generator=gen)
    tasks = {
        "A": (x[train], y[train], x[test], y[test]),
        "B": (x[train][:, perm], y[train], x[test][:, perm], y[test]),
    }
    return tasks, source


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def train(model, x, y, epochs: int, seed: int, ewc: EWC | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for xb, yb in batches(x[order], y[order], 64):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            if ewc is not None:
                loss = loss + ewc.penalty(model)
            loss.backward()
            opt.step()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds")
    parser.add_argument("--out", default="runs/examples/ewc_digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", type=float, default=20.0, help="EWC strength")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    epochs = 5 if args.quick else 30
    names = ["PMatDiag", "PMatKFAC"] if args.quick else list(REPRESENTATIONS)
    tasks, source = make_tasks(args.seed)
    xa, ya, xa_test, ya_test = tasks["A"]
    xb, yb, xb_test, yb_test = tasks["B"]

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    train(model, xa, ya, epochs, args.seed)
    acc_a = accuracy(model, xa_test, ya_test)
    print(f"data: {source}; {sum(p.numel() for p in model.parameters())} parameters")
    print(f"after task A: test accuracy on A {acc_a:.3f}")

    results = {"after A": {"A": acc_a}}
    runs: dict[str, EWC | None] = {"fine-tuning": None}
    for name in names:
        runs[f"EWC {name}"] = EWC(args.lam, REPRESENTATIONS[name])
    print(f"{'method':<20} {'acc A':>6} {'acc B':>6} {'Fisher s':>8} {'train B s':>9}")
    for label, ewc in runs.items():
        learner = copy.deepcopy(model)
        fisher_s = 0.0
        if ewc is not None:
            start = time.perf_counter()
            ewc.consolidate(learner, batches(xa, ya, 256))
            fisher_s = time.perf_counter() - start
        start = time.perf_counter()
        train(learner, xb, yb, epochs, args.seed + 1, ewc)
        train_s = time.perf_counter() - start
        acc = {
            "A": accuracy(learner, xa_test, ya_test),
            "B": accuracy(learner, xb_test, yb_test),
        }
        results[label] = {**acc, "fisher_s": fisher_s, "train_B_s": train_s}
        print(
            f"{label:<20} {acc['A']:>6.3f} {acc['B']:>6.3f} {fisher_s:>8.2f} {train_s:>9.2f}"
        )

    out = Path(args.out)
    if not write_results(out, results):
        return 1
    plt = pyplot()
    if plt is None:
        print(f"wrote {out / 'results.json'} (no plot: matplotlib not installed)")
        return 0
    labels = [k for k in results if k != "after A"]
    pos = torch.arange(len(labels)).tolist()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(
        [p - 0.2 for p in pos], [results[k]["A"] for k in labels], 0.4, label="task A"
    )
    ax.bar(
        [p + 0.2 for p in pos], [results[k]["B"] for k in labels], 0.4, label="task B"
    )
    ax.axhline(acc_a, color="k", ls=":", lw=1, label="A before B")
    ax.set_xticks(pos, labels, rotation=20, fontsize=8)
    ax.set_ylabel("test accuracy after learning B")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'results.json'} and {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
