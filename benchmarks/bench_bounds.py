"""What the floor leaves for two quantities the suite's 1.1 x target misses.

``.venv/bin/python -m benchmarks.bench_bounds [--threads N] [--rounds R]``

- **MC diagonal on the MLP** (``mlp_mc_diag``). A Monte-Carlo diagonal does
  the floor's matrix products (its products of squares replace the weight
  gradients), plus a softmax, a sampled label and squares per batch. This
  times, round-robin, the floor, a hand-written loop that does only that
  (plain ``nn.Sequential`` forward, ``autograd.grad`` to the layer outputs,
  ``addmm_`` of squares into the sums; no hooks, no checks, no library), and
  ``nnfim.FIM(..., PMatDiag, fisher_type="mc")``. Medians over the rounds.
- **Fisher-vector product** (``mlp_mv``, ``cnn_mv``). Any ``F v`` needs the
  forward-mode product ``J v`` on top of a forward and a backward; this
  prints the multiply-adds of each for the suite's MLP and CNN, from the
  layer shapes: the ratio is what ``F v`` costs over the floor in arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import nnfim
from benchmarks._common import floor_c
from benchmarks.workloads import Workload, make_workload


def hand_mc_diag(w: Workload) -> Callable[[], list[torch.Tensor]]:
    """The Monte-Carlo diagonal of a Linear/ReLU ``nn.Sequential``, by hand."""
    layers = [m for m in w.model if isinstance(m, nn.Linear)]

    def run() -> list[torch.Tensor]:
        acc = [torch.zeros_like(m.weight) for m in layers]
        gen = torch.Generator().manual_seed(0)
        for x, _ in w.batches:
            inputs, outputs = [], []
            h = x
            for module in w.model:
                if isinstance(module, nn.Linear):
                    inputs.append(h.detach())
                    h = module(h)
                    outputs.append(h)
                else:
                    h = module(h)
            p = torch.softmax(h.detach(), -1)
            y = torch.multinomial(p, 1, generator=gen)
            d = p.scatter_add_(-1, y, p.new_full(y.shape, -1.0))
            grads = torch.autograd.grad(h, outputs, d)
            for a, xi, gi in zip(acc, inputs, grads, strict=True):
                a.addmm_((gi * gi).t(), xi * xi)
        return acc

    return run


def mv_multiply_adds(kind: str) -> tuple[int, int]:
    """Multiply-adds per example of the floor (one output) and of ``F v``.

    Floor: forward, and a backward to the weights and to every layer input but
    the first. ``F v``: the same forward and backward, and ``J v``: per layer
    ``x W_t^T`` (the weight tangent) and, past the first layer, ``x_t W^T``.
    """
    if kind == "mlp":
        shapes = [(784, 256, 1), (256, 256, 1), (256, 10, 1)]  # in, out, positions
    else:  # the suite's CNN: 3x3 convolutions on 32 x 32, then Linear(512, 10)
        shapes = [(3 * 9, 16, 1024), (16 * 9, 32, 1024), (512, 10, 1)]
    macs = [i * o * t for i, o, t in shapes]
    forward = sum(macs)
    backward = sum(macs) + sum(macs[1:])  # weights, and inputs past the first
    jv = sum(macs) + sum(macs[1:])
    return forward + backward, forward + jv + backward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    w = make_workload("mlp")
    cases = {
        "floor": floor_c(w.model, w.batches, 1),
        "hand-written": hand_mc_diag(w),
        "nnfim": lambda: nnfim.FIM(
            w.model, w.batches, nnfim.PMatDiag, fisher_type="mc"
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["floor"])
    print("| MLP Monte-Carlo diagonal | median ms | x floor |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {med / floor:.2f} |")
    print()
    print("| Fisher-vector product | floor multiply-adds | F v multiply-adds | ratio |")
    print("|---|---|---|---|")
    for kind in ("mlp", "cnn"):
        fl, fv = mv_multiply_adds(kind)
        print(f"| {kind} | {fl:,} | {fv:,} | {fv / fl:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
