"""TrainingMonitor overhead per recorded step, against the training step it watches.

Workload: the built-in MLP 64-32-10 (2,410 parameters) on the digits images
(`nnfim.data`), SGD lr 0.1, cross-entropy, float32, 1 thread. For each batch
size, one timed round runs ``--steps`` training steps (forward, backward,
optimizer step) and, on the same batches, ``monitor.step`` after each backward
(every step recorded). Rounds alternate the cases (round-robin) so that load
from elsewhere hits all of them alike; the table gives medians per step and the
ratio of the recorded step's overhead to a plain training step.

    .venv/bin/python -m benchmarks.bench_monitor            # 3 rounds x 12 steps
    .venv/bin/python -m benchmarks.bench_monitor --quick    # 2 rounds x 6 steps
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import finish, markdown
from nnfim.apps import TrainingMonitor
from nnfim.data import batches, load_dataset
from nnfim.models import build_model

THREADS = 1  # the CLI's default: small tensors, and a busy machine stalls OpenMP
RESULTS = Path(__file__).resolve().parent / "results" / "monitor.json"
# (batch size, examples of it in the spectrum): the Gram dual is (10 m)^2
CASES = [(32, None), (64, None), (128, None), (128, 64), (256, 64)]


def one_round(bs: int, m: int | None, steps: int, seed: int) -> tuple[float, float]:
    """Median seconds per plain training step and per monitor.step (recorded)."""
    data = load_dataset("digits", seed)
    model = build_model("mlp", 10, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = TrainingMonitor(every=1, max_examples=m)
    loader = batches(
        data.x_train, data.y_train, bs, torch.Generator().manual_seed(seed)
    )
    train_t, mon_t = [], []
    for i in range(steps):
        xb, yb = loader[i % len(loader)]
        gc.collect()
        start = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        mid = time.perf_counter()
        monitor.step(model, (xb, yb), loss=loss, optimizer=opt)
        end = time.perf_counter()
        opt.step()
        train_t.append(time.perf_counter() - end + (mid - start))
        mon_t.append(end - mid)
    return statistics.median(train_t), statistics.median(mon_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 6 steps")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results")
    args = parser.parse_args()
    rounds, steps = (2, 6) if args.quick else (3, 12)
    torch.set_num_threads(THREADS)
    info = {"loadavg_start": os.getloadavg(), "rounds": rounds, "steps": steps}
    for bs, m in CASES:  # warm-up (torch's first passes script and allocate)
        one_round(bs, m, 2, 0)
    timings: dict[str, list[tuple[float, float]]] = {}
    for r in range(rounds):
        for bs, m in CASES:
            timings.setdefault(f"{bs}/{m}", []).append(one_round(bs, m, steps, r))
    lines, result = [], {}
    for bs, m in CASES:
        key = f"{bs}/{m}"
        train = statistics.median(t for t, _ in timings[key])
        mon = statistics.median(t for _, t in timings[key])
        k = 10 * (m or bs)
        result[key] = {"train_step_s": train, "monitor_step_s": mon, "gram_size": k}
        lines.append(
            [
                str(bs),
                str(m or bs),
                f"{k} x {k}",
                f"{1e3 * train:.2f}",
                f"{1e3 * mon:.2f}",
                f"{mon / train:.1f} x",
            ]
        )
    headers = [
        "batch",
        "examples in spectrum",
        "Gram dual",
        "train step (ms)",
        "monitor.step (ms)",
        "overhead / train step",
    ]
    print(markdown(headers, lines))
    info["loadavg_end"] = os.getloadavg()
    finish(info, result, args.out, THREADS)


if __name__ == "__main__":
    main()
