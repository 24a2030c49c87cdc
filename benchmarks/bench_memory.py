"""Time against peak memory: nnfim's ``sub_batch`` on the MLP rows, with the peers.

``.bench-venv/bin/python -m benchmarks.bench_memory [--rounds R] [--inner N]``

The issue asks for peak memory no worse than the best peer's, and for times
that on the MLP rows only joined loader batches reach (``sub_batch="auto"``
joins them on CPU; ``docs/benchmarks.md`` says why). This runs those rows
with every ``sub_batch`` setting, next to the floor and every installed peer,
by the suite's protocol (a fresh process per case and round, round-robin, a
warm-up, one run for the peak, then timed runs; ``benchmarks.suite``), and
prints for each setting the median time against the floor and the fastest
peer, and the peak against the peer that needs the least memory:

- ``"auto"`` (the default): batches cut or joined to pieces of about 16 MiB;
- ``None``: the loader's batches as they come (256 examples);
- an int: pieces of that many examples, never joined.

Every setting computes the same matrix (Monte-Carlo labels are drawn per
loader batch whatever the pieces); the last column is its relative error
against the default's result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import groups
from benchmarks.groups import SubBatch
from benchmarks.suite import (
    NOT_PEERS,
    Case,
    Prepare,
    relative_error,
    run_child,
    target_of,
    time_cases,
)
from benchmarks.workloads import THREADS

#: the ``sub_batch`` settings timed, the default first
SETTINGS: tuple[SubBatch, ...] = ("auto", None, 64, 32)
#: the rows whose nnfim peak is above the best peer's at the default
PREPARE: dict[str, Callable[[SubBatch], Prepare]] = {
    "mlp_diag": lambda s: partial(groups.nnfim_diag, sub_batch=s),
    "mlp_mc_diag": lambda s: partial(groups.nnfim_diag, mc=True, sub_batch=s),
    "mlp_kfac": lambda s: partial(groups.nnfim_kfac, sub_batch=s),
    "mlp_ekfac": lambda s: partial(groups.nnfim_kfac, ekfac=True, sub_batch=s),
    "mlp_mv": lambda s: partial(groups.nnfim_mv, sub_batch=s),
}


def lib_name(setting: SubBatch) -> str:
    """``"nnfim"`` for the default (the suite's name), else the setting."""
    return "nnfim" if setting == "auto" else f"nnfim sub_batch={setting}"


def _cases() -> list[Case]:
    out = []
    for name, prepare in PREPARE.items():
        group = groups.G[name]
        out += [c for c in groups.CASES if c.group is group and c.lib != "nnfim"]
        out += [Case(group, lib_name(s), prepare(s)) for s in SETTINGS]
    return out


CASES = _cases()
CASE_BY_NAME = {case.name: case for case in CASES}


def table(
    seconds: dict[str, list[float]],
    peaks: dict[str, list[float]],
    errors: dict[str, float],
) -> str:
    """One row per case; nnfim's rows say whether time and memory meet the rule."""
    med = {k: statistics.median(v) for k, v in seconds.items() if v}
    peak = {k: statistics.median(v) for k, v in peaks.items() if v}
    lines = [
        "| group | library | median ms | x floor | x fastest peer | peak MiB "
        "| x least-memory peer | time rule | memory rule | rel. err vs default |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PREPARE:
        rows = [c for c in CASES if c.group.name == name and c.name in med]
        peers = [
            c.name for c in rows if c.lib not in NOT_PEERS and "nnfim" not in c.lib
        ]
        floor = med.get(f"{name}/floor")
        fastest = min((med[p] for p in peers), default=None)
        least = min((peak[p] for p in peers if p in peak), default=None)
        for i, case in enumerate(rows):
            t = med[case.name]
            cells = [
                f"**{name}**" if i == 0 else "",
                case.lib,
                f"{t * 1e3:.1f}",
                f"{t / floor:.2f}" if floor else "-",
                f"{t / fastest:.2f}" if fastest else "-",
                f"{peak[case.name]:.0f}" if case.name in peak else "-",
                f"{peak[case.name] / least:.2f}"
                if least and case.name in peak
                else "-",
            ]
            if case.lib.startswith("nnfim"):
                rule = target_of(t, fastest, floor)
                mem_ok = least is not None and peak.get(case.name, 1e9) <= least
                err = errors.get(case.name)
                cells += [
                    rule["status"],
                    "pass" if mem_ok else "FAIL",
                    "-" if err is None else f"{err:.1e}",
                ]
            else:
                cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inner", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(PREPARE), help="groups")
    parser.add_argument("--child", choices=sorted(CASE_BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    if args.child:
        result = run_child(CASE_BY_NAME[args.child], args.inner, args.quick, args.save)
        print(json.dumps(result))
        return 0
    if args.rounds < 1 or args.inner < 1:
        parser.error("--rounds and --inner must be at least 1")
    cases = [c for c in CASES if c.installed and c.group.name in (args.only or PREPARE)]
    with tempfile.TemporaryDirectory() as tmp:
        t = time_cases(
            "benchmarks.bench_memory", cases, args.rounds, args.inner, False, Path(tmp)
        )
        errors: dict[str, float] = {}
        for case in cases:
            default = f"{case.group.name}/nnfim"
            if case.lib.startswith("nnfim ") and {case.name, default} <= set(t.saved):
                result: Any = torch.load(t.saved[case.name], weights_only=True)
                ref = torch.load(t.saved[default], weights_only=True)
                errors[case.name] = relative_error(result, ref)
    for name, message in t.errors.items():
        print(f"{name} failed: {message.splitlines()[-1] if message else ''}")
    print()
    print(table(t.seconds, t.peaks, errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
