"""nnfim against its peers, every workload side by side: ``python -m benchmarks``.

``make bench`` runs the full suite from ``.bench-venv`` (``make bench-env``
installs the peers); ``--quick`` runs a reduced set on less data. Peers that
are not installed are reported as such. ``--help`` lists the options;
``benchmarks/README.md`` says what every case computes and how conventions
are aligned.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import report, workloads
from benchmarks.groups import CASE_BY_NAME, CASES
from benchmarks.suite import Case, agreement, run_child, summarize, time_cases
from benchmarks.workloads import THREADS, make_workload

DEFAULT_ROUNDS, DEFAULT_INNER = 3, 2
QUICK_ROUNDS, QUICK_INNER = 1, 1
RESULTS = Path(__file__).resolve().parent / "results"


def select(
    patterns: Sequence[str] | None, quick: bool, cases: Sequence[Case] = CASES
) -> list[Case]:
    """The cases whose ``group/lib`` name matches a pattern (default: all, or quick)."""
    if patterns:
        return [c for c in cases if any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    return [c for c in cases if (c.group.quick and c.quick) or not quick]


def profile_case(name: str, quick: bool, rows: int = 25) -> None:
    """Print the operators that dominate one warm run of ``name``."""
    case = CASE_BY_NAME[name]
    thunk, _ = case.prepare(make_workload(case.group.workload, quick))
    thunk()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        thunk()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run(
    cases: list[Case],
    rounds: int,
    inner: int,
    quick: bool,
    out: Path,
    docs: Path | None = None,
    module: str = "benchmarks",
) -> list[dict[str, object]]:
    """Time ``cases``, check agreement, print and write the report; return its rows."""
    info = report.meta(rounds, inner, quick)
    print(report.machine_line(info).split("; 1-min")[0])
    src = info["nnfim_source"]
    print(
        f"nnfim from {src['path']} at {str(src['commit'])[:10]}"
        + (" + uncommitted changes" if src["dirty"] else "")
    )
    runnable = [c for c in cases if c.installed]
    missing = sorted({c.needs for c in cases if not c.installed and c.needs})
    if missing:
        print(f"not installed (reported as such): {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        timings = time_cases(module, runnable, rounds, inner, quick, Path(tmp))
        agree = agreement(runnable, timings.saved, quick)
    for case in cases:
        timings.seconds.setdefault(case.name, [])
        timings.peaks.setdefault(case.name, [])
    rows = summarize(cases, timings, agree)
    info["loadavg_end"] = os.getloadavg()
    info["nnfim_source_end"] = report.nnfim_source()
    text = report.render(info, cases, rows)
    print("\n" + text)
    js, md = report.write(out, info, rows, text, agree)
    print(f"wrote {js} and {md}")
    if docs is not None:
        report.update_docs(docs, text)
        print(f"updated {docs}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the quick groups on less data, {QUICK_ROUNDS} round x {QUICK_INNER} run",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="GLOB",
        help="glob patterns on 'group/lib' case names, e.g. 'mlp_*' '*/nnfim'",
    )
    parser.add_argument("--rounds", type=int, help="round-robin rounds (default 3)")
    parser.add_argument("--inner", type=int, help="timed runs per process (default 2)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for bench.json and bench.md"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help="also write the table into this page, between its bench markers",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help=f"torch threads per process (default {THREADS}; 1 on a crowded machine)",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--profile", choices=sorted(CASE_BY_NAME), help="profile one case and exit"
    )
    parser.add_argument("--child", choices=sorted(CASE_BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        # the children read it at import: benchmarks.workloads.THREADS
        os.environ["NNFIM_BENCH_THREADS"] = str(args.threads)
        workloads.THREADS = args.threads
    torch.set_num_threads(workloads.THREADS)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    inner = args.inner or (QUICK_INNER if args.quick else DEFAULT_INNER)
    if args.child:
        import json

        result = run_child(CASE_BY_NAME[args.child], inner, args.quick, args.save)
        print(json.dumps(result))
        return 0
    if args.profile:
        profile_case(args.profile, args.quick)
        return 0
    if rounds < 1 or inner < 1:
        parser.error("--rounds and --inner must be at least 1")
    cases = select(args.only, args.quick)
    if not cases:
        parser.error(f"no case matches {args.only}; --list shows them")
    if args.list:
        for c in cases:
            state = "" if c.installed else f"  ({c.needs} not installed)"
            print(f"{c.name:<28} {c.group.workload:<13} {c.group.description}{state}")
        return 0
    run(cases, rounds, inner, args.quick, args.out, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
