"""Batched or looped backward of the output directions, side by side.

``.venv/bin/python -m benchmarks.bench_directions [--threads N] [--rounds R]``
times ``FIM(..., PMatKFAC)`` and ``FIM(..., PMatDiag)`` on the suite's CNN and
MLP with the ``K`` output directions backpropagated in one batched backward
(``is_grads_batched``) or one after the other, against the floor (forward plus
``K`` backward passes). nnfim picks the loop where the graph holds
convolutions or pooling (``batching_is_slow``): this is the measurement
behind that choice. Minimums over the rounds, ratios to the floor.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import nnfim
from benchmarks._common import floor_c
from benchmarks.workloads import make_workload
from nnfim.generator import jacobian


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    detect = jacobian.batching_is_slow
    print("| workload | matrix | floor s | looped x floor | batched x floor |")
    print("|---|---|---|---|---|")
    try:
        for kind in ("cnn", "mlp"):
            w = make_workload(kind)
            floor = floor_c(w.model, w.batches, 10)
            for rep in (nnfim.PMatKFAC, nnfim.PMatDiag):
                times: dict[str, list[float]] = {"floor": [], "loop": [], "batched": []}
                for r in range(args.rounds + 1):  # round 0 warms up
                    got = {"floor": _timed(floor)}
                    for mode in ("loop", "batched"):
                        slow = mode == "loop"
                        jacobian.batching_is_slow = lambda out, s=slow: s  # type: ignore[misc]
                        got[mode] = _timed(
                            lambda rep=rep, w=w: nnfim.FIM(w.model, w.batches, rep)
                        )
                    if r:
                        for key, value in got.items():
                            times[key].append(value)
                best = {k: min(v) for k, v in times.items()}
                print(
                    f"| {kind} | {rep.__name__} | {best['floor']:.3f} | "
                    f"{best['loop'] / best['floor']:.2f} | "
                    f"{best['batched'] / best['floor']:.2f} |",
                    flush=True,
                )
    finally:
        jacobian.batching_is_slow = detect
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
