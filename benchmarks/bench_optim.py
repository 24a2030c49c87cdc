"""Optimizers on the digits images: epochs and time to a training-loss target.

    .venv/bin/python -m benchmarks.bench_optim [--quick] [--target 0.05]

The small CNN, data and optimizer settings of
``docs/examples/optimizers_digits.py`` (imported from there): SGD (momentum),
Adam, K-FAC and EKFAC (Monte-Carlo Fisher, factors every step, eigenbasis
every 10 steps) each train the same initial network on the same minibatches
(64 images) until the mean training loss over the 1,797 images is at most
``--target`` (checked after every epoch). Reported: epochs and seconds of
training steps to the target, and the per-step time as a ratio to SGD's,
measured separately in round-robin rounds (each round times ``--steps`` steps of
every optimizer in turn on the same batches, after one warm-up round) so that
load from elsewhere hits all optimizers alike; the table gives the median over
rounds.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import finish, markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "runs" / "bench" / "bench_optim.json"


def load_example() -> Any:
    path = ROOT / "docs" / "examples" / "optimizers_digits.py"
    if str(path.parent) not in sys.path:  # the example imports its _common.py
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("optimizers_digits", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_times(ex: Any, x, y, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of every optimizer, round-robin over ``rounds``."""
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 64 * steps, 64)]
    state = {}
    for name in ex.OPTIMIZERS:
        model = ex.make_model(0)
        state[name] = (model, ex.OPTIMIZERS[name](model))
    times: dict[str, list[float]] = {name: [] for name in ex.OPTIMIZERS}
    for r in range(rounds + 1):
        for name, (model, opt) in state.items():
            gc.collect()
            start = time.perf_counter()
            for xb, yb in batches:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                if name in ("KFAC", "EKFAC"):
                    opt.step(batch=(xb, yb))
                else:
                    opt.step()
            if r > 0:  # round 0 warms up
                times[name].append((time.perf_counter() - start) / len(batches))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and rounds")
    parser.add_argument("--target", type=float, default=0.05)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    threads = 2
    torch.set_num_threads(threads)
    info: dict[str, Any] = {"loadavg_start": os.getloadavg(), "threads": threads}
    ex = load_example()
    x, y, source = ex.load_digits_data(0)
    max_epochs = 3 if args.quick else args.max_epochs
    init = ex.make_model(0)
    print(f"data: {source}, {len(x)} images; target training loss {args.target}")
    runs = {}
    for name in ex.OPTIMIZERS:
        res = ex.train(
            name, copy.deepcopy(init), x, y, max_epochs, 0, stop_at=args.target
        )
        reached = ex.epochs_to(res["losses"], args.target)
        res["epochs_to_target"] = reached
        res["seconds_to_target"] = None if reached is None else res["elapsed"][reached]
        runs[name] = res
    rounds, steps = (2, 4) if args.quick else (5, 10)
    times = step_times(ex, x, y, steps, rounds)
    medians = {n: statistics.median(t) for n, t in times.items()}
    lines = []
    for name, res in runs.items():
        reached = res["epochs_to_target"]
        lines.append(
            [
                name,
                "-" if reached is None else str(reached),
                "-" if reached is None else f"{res['seconds_to_target']:.1f}",
                f"{res['losses'][-1]:.4f} after {len(res['losses']) - 1}",
                f"{1e3 * medians[name]:.1f}",
                f"{medians[name] / medians['SGD']:.2f}",
                f"{max(times[name]) / min(times[name]):.2f}",
            ]
        )
    print(
        markdown(
            [
                "optimizer",
                f"epochs to loss <= {args.target}",
                "step seconds to target",
                "last loss (epochs)",
                "step ms (median)",
                "step / SGD step",
                "spread max/min",
            ],
            lines,
        )
    )
    info["loadavg_end"] = os.getloadavg()
    finish(info, {"runs": runs, "step_times": times}, args.out, threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
