"""The small transformer with the exact Fisher (``C = 1,000`` output directions).

``.venv/bin/python -m benchmarks.bench_lm_exact [--sequences N] [--threads T] [--repeats R]``
times the exact diagonal and the exact K-FAC of the layer-coverage issue's
transformer (the suite's ``lm`` workload: tied token embedding and head) on
one batch of ``N`` sequences, against the floor: one forward and ``C``
backward passes. The tied embedding goes through the layer rules (its two
uses summed, :mod:`nnfim.generator.shared`); K-FAC holds it as a sum of two
Kronecker terms. Rows without it are given for comparison. The positional
embedding, called on ``arange(T)`` and shared by the batch, is expanded over
it and goes through the Embedding rule. Process CPU time, the minimum of
``R`` alternating runs after a warm-up.

Measured at commit 7640663 (the issue's batch of 32 sequences, 2 threads,
minimum of 2 alternating runs, process CPU time, Intel Xeon, 2 cores; floor
8.06 s): ``python -m benchmarks.bench_lm_exact --sequences 32 --threads 2
--repeats 2``

| case | x floor |
|---|---|
| exact diagonal | 1.99 |
| exact diagonal, tied embedding left out | 1.97 |
| exact K-FAC, tied | 2.09 |
| exact K-FAC, tied embedding left out | 2.02 |

docs/benchmarks.md has the earlier figures.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import nnfim
from benchmarks._common import floor_c
from benchmarks.workloads import LM, LM_SEQ, LM_VOCAB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = LM().eval()
    tokens = torch.randint(0, LM_VOCAB, (args.sequences, LM_SEQ))
    loader = [tokens]
    lc = nnfim.LayerCollection.from_model(lm)
    no_tok = lc.subset(names=[n for n in lc.layer_names if n != "tok"])
    cases: dict[str, Callable[[], object]] = {
        "floor: forward + C backward": floor_c(lm, [(tokens, None)], LM_VOCAB),
        "exact diagonal": lambda: nnfim.FIM(lm, loader, nnfim.PMatDiag),
        "exact diagonal, tied embedding left out": lambda: nnfim.FIM(
            lm, loader, nnfim.PMatDiag, layer_collection=no_tok
        ),
        "exact K-FAC, tied": lambda: nnfim.FIM(lm, loader, nnfim.PMatKFAC),
        "exact K-FAC, tied embedding left out": lambda: nnfim.FIM(
            lm, loader, nnfim.PMatKFAC, layer_collection=no_tok
        ),
    }
    for fn in cases.values():  # warm-up
        fn()
    seconds: dict[str, float] = {}
    for _ in range(args.repeats):  # alternating repeats, the minimum of each
        for name, fn in cases.items():
            start = time.process_time()
            fn()
            spent = time.process_time() - start
            seconds[name] = min(seconds.get(name, spent), spent)
    floor = seconds["floor: forward + C backward"]
    print("| case | CPU s | x floor |")
    print("|---|---|---|")
    for name, spent in seconds.items():
        print(f"| {name} | {spent:.2f} | {spent / floor:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
