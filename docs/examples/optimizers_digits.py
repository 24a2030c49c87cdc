"""SGD, Adam, K-FAC and EKFAC training a small CNN on the digits images.

    python docs/examples/optimizers_digits.py [--quick] [--out DIR]

Each optimizer trains the same initial network (two 3x3 convolutions and a
linear layer, 8x8 images) on the same minibatches; the script prints the
training loss after every epoch, the epoch at which it first falls below
``--target`` and the mean wall time of one step, and writes ``results.json``
(and ``loss.png`` with matplotlib) into ``--out`` (default
``runs/examples/optimizers_digits``). K-FAC and EKFAC get the batch for their
curvature with ``opt.step(batch=(x, y))``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import pyplot, write_results
from torch import nn

from nnfim import EKFAC, KFAC
from nnfim.demo import load_digits_data


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


#: name -> (model -> optimizer); the settings the docs' figures use
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    "KFAC": lambda m: KFAC(m, lr=0.1, damping=1e-2, momentum=0.5, kl_clip=1e-3),
    "EKFAC": lambda m: EKFAC(m, lr=0.1, damping=1e-2, momentum=0.5, kl_clip=1e-3),
}


def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def train(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    stop_at: float | None = None,
) -> dict[str, Any]:
    """Train with optimizer ``name``.

    Returns:
        ``losses`` (training loss before the first and after every epoch),
        ``elapsed`` (seconds spent in training steps at the end of every epoch,
        loss evaluations excluded) and ``step_s`` (mean step time). Training
        stops early once the loss is at most ``stop_at``.
    """
    opt = OPTIMIZERS[name](model)
    gen = torch.Generator().manual_seed(seed)
    losses, step_times, elapsed = [full_loss(model, x, y)], [], [0.0]
    for _ in range(epochs):
        if stop_at is not None and losses[-1] <= stop_at:
            break
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            xb, yb = x[order[i : i + batch_size]], y[order[i : i + batch_size]]
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            if isinstance(opt, (KFAC, EKFAC)):
                opt.step(batch=(xb, yb))
            else:
                opt.step()
            step_times.append(time.perf_counter() - start)
        losses.append(full_loss(model, x, y))
        elapsed.append(sum(step_times))
    return {
        "losses": losses,
        "elapsed": elapsed,
        "step_s": sum(step_times) / max(len(step_times), 1),
    }


def epochs_to(losses: list[float], target: float) -> int | None:
    return next((e for e, v in enumerate(losses) if v <= target), None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds")
    parser.add_argument("--out", default="runs/examples/optimizers_digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.05, help="training loss")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x, y, source = load_digits_data(args.seed)
    if args.quick:
        x, y = x[:512], y[:512]
    epochs = args.epochs or (2 if args.quick else 15)
    init = make_model(args.seed)
    print(f"data: {source}, {len(x)} training images; {epochs} epochs")
    results = {}
    for name in OPTIMIZERS:
        results[name] = train(name, copy.deepcopy(init), x, y, epochs, args.seed)
        res = results[name]
        reached = epochs_to(res["losses"], args.target)
        res["epochs_to_target"] = reached
        curve = " ".join(f"{v:.3f}" for v in res["losses"])
        print(
            f"{name:<6} step {1e3 * res['step_s']:6.1f} ms  epochs to loss <= "
            f"{args.target}: {reached}  losses: {curve}"
        )
    sgd = results["SGD"]["step_s"]
    for res in results.values():
        res["step_ratio_to_SGD"] = res["step_s"] / sgd
    print(
        "step time / SGD step time: "
        + ", ".join(f"{n} {r['step_ratio_to_SGD']:.2f}" for n, r in results.items())
    )
    out = Path(args.out)
    if not write_results(out, results):
        return 1
    plt = pyplot()
    if plt is None:
        print(f"wrote {out / 'results.json'} (no plot: matplotlib not installed)")
        return 0
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, res in results.items():
        ax.semilogy(res["losses"], label=name)
    ax.axhline(args.target, color="k", ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'results.json'} and {out / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
