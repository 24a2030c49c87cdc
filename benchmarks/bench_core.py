"""Core cost ratios of nnfim on an MLP, measured side by side in one run.

Run ``python -m benchmarks.bench_core`` (``make bench``); ``--help`` lists the
options. Absolute seconds depend on the machine and its load; the ratios to a
plain autograd baseline timed in the same run are what this script reports.
The cases are timed round-robin (one run of every case per round) so that a
burst of load from elsewhere hits all of them alike.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import nnfim
from benchmarks._common import finish, floor_c, markdown

SEED = 0
SIZES = (784, 256, 256, 10)
N_CLASSES = SIZES[-1]
N_EXAMPLES = 2048
BATCH_SIZE = 256
THREADS = 2
#: examples per torch.func Jacobian (chunk, C, P): at 4 its largest block (first
#: weight, float32) is ~32 MB; larger chunks ran ~2x slower here (fresh pages)
FUNC_CHUNK = 4
DEFAULT_REPEATS = 5
QUICK_REPEATS = 2
#: a case whose slowest run exceeds its fastest by this factor is flagged
NOISY_SPREAD = 2.0
#: examples of the warm-up run before a "warm" memory baseline
WARMUP_EXAMPLES = 8
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "core.json"

Thunk = Callable[[], Any]


# -- workload -------------------------------------------------------------------
@dataclass
class Workload:
    """The MLP and its data: a list of ``(x, y)`` batches used as the loader."""

    model: nn.Module
    loader: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


def make_workload(seed: int = SEED) -> Workload:
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(N_EXAMPLES, SIZES[0])
    y = torch.randint(0, N_CLASSES, (N_EXAMPLES,))
    loader = list(zip(x.split(BATCH_SIZE), y.split(BATCH_SIZE), strict=True))
    return Workload(model, loader)


# -- cases: each prepares its inputs and returns the thunk that is timed ---------
def prepare_floor_c(w: Workload) -> Thunk:
    """One forward and C backward passes to the parameters per batch."""
    return floor_c(w.model, w.loader, N_CLASSES)


def prepare_fwd_bwd(w: Workload) -> Thunk:
    """The gradient of a training step per batch, without an optimizer."""
    params = w.params

    def run() -> None:
        for x, y in w.loader:
            loss = F.cross_entropy(w.model(x), y)
            torch.autograd.grad(loss, params)

    return run


def prepare_nnfim_diag(w: Workload) -> Thunk:
    return lambda: nnfim.FIM(w.model, w.loader, representation=nnfim.PMatDiag).diag()


def prepare_func_diag(w: Workload) -> Thunk:
    """An independent exact diagonal: per-example Jacobians from ``torch.func``.

    ``diag(J^T H J) = sum_c p_c J_c^2 - (sum_c p_c J_c)^2`` for
    ``H = diag(p) - p p^T``, summed over examples and then divided by ``n``,
    since nnfim's Fisher is a mean over examples.
    """
    params = {k: p.detach() for k, p in w.model.named_parameters()}

    def logits(prm: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        out = functional_call(w.model, prm, (x[None],))[0]
        return out, out

    jac = vmap(jacrev(logits, has_aux=True), in_dims=(None, 0))

    def run() -> torch.Tensor:
        acc = {k: torch.zeros(1, p.numel()) for k, p in params.items()}
        for x, _ in w.loader:
            for xc in x.split(FUNC_CHUNK):
                jacs, out = jac(params, xc)
                p = torch.softmax(out, -1)
                for k, j in jacs.items():
                    # (m, C, q), contiguous: neither product below copies it
                    j = j.flatten(2)
                    pj = torch.bmm(p[:, None, :], j)
                    acc[k] += p.reshape(1, -1) @ (j * j).flatten(0, 1)
                    acc[k] -= (pj * pj).sum((0, 1))
        return torch.cat(list(acc.values()), 1)[0] / N_EXAMPLES

    return run


def prepare_nnfim_mc(w: Workload) -> Thunk:
    return lambda: nnfim.FIM_MonteCarlo(w.model, w.loader, nnfim.PMatDiag, trials=1)


def prepare_nnfim_mv(w: Workload) -> Thunk:
    fim = nnfim.FIM(w.model, w.loader, representation=nnfim.PMatImplicit)
    lc = fim.layer_collection
    v = nnfim.PVector.from_flat(lc, torch.randn(lc.numel()))
    return lambda: fim.mv(v)


@dataclass(frozen=True)
class Case:
    """A timed case; ``ratio = median / median(baseline)``, to meet ``target``."""

    name: str
    prepare: Callable[[Workload], Thunk]
    baseline: str | None = None
    target: float | None = None


CASES = (
    Case("floor_C", prepare_floor_c),
    Case("fwd_bwd", prepare_fwd_bwd),
    Case("nnfim_diag", prepare_nnfim_diag, "floor_C", 1.1),
    Case("func_diag", prepare_func_diag, "floor_C"),
    Case("nnfim_mc_diag", prepare_nnfim_mc, "fwd_bwd", 1.6),
    Case("nnfim_implicit_mv", prepare_nnfim_mv, "fwd_bwd", 2.0),
)
CASE_BY_NAME = {case.name: case for case in CASES}
#: peak memory of building the diagonal over that of the training-step pass
MEMORY_CASE, MEMORY_BASELINE, MEMORY_TARGET = "nnfim_diag", "fwd_bwd", 4.0
#: nnfim's diagonal against torch.func's, both float32 (seen: ~1e-7)
DIAG_RTOL = 1e-4


# -- timing ---------------------------------------------------------------------
def time_cases(
    w: Workload, cases: tuple[Case, ...], repeats: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Warm every case up once, then time ``repeats`` rounds of all of them.

    Returns:
        The seconds of every run per case, and the warm-up results per case.
    """
    thunks = {case.name: case.prepare(w) for case in cases}
    outputs = {name: thunk() for name, thunk in thunks.items()}
    seconds: dict[str, list[float]] = {name: [] for name in thunks}
    for _ in range(repeats):
        for name, thunk in thunks.items():
            gc.collect()
            start = time.perf_counter()
            thunk()
            seconds[name].append(time.perf_counter() - start)
    return seconds, outputs


def relative_error(w: Workload, ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``|ours - ref| / |ref|``, nnfim's flat order mapped to ``named_parameters``."""
    lc = nnfim.LayerCollection.from_model(w.model)
    by_name = lc.unflatten(ours)
    ours = torch.cat([by_name[k].reshape(-1) for k, _ in w.model.named_parameters()])
    return float((ours - ref).norm() / ref.norm())


# -- peak memory, one fresh process per case -------------------------------------
def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux ``VmHWM`` is read instead of ``ru_maxrss``: the kernel carries
    ``ru_maxrss`` over ``fork`` and ``exec``, so a child started by a parent
    that once held more memory reports the parent's peak and shows no growth.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    scale = 1 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def memory_child(name: str, warm: bool) -> float:
    """Peak RSS growth (MiB) of one run of ``name`` in this fresh process.

    The baseline is taken after building the model, the data and the case's
    inputs. With ``warm``, the case first runs once on a batch of
    ``WARMUP_EXAMPLES`` examples, so that the code it loads on first use and
    the allocator's one-time growth are in the baseline, not in the growth.
    """
    w = make_workload()
    case = CASE_BY_NAME[name]
    if warm:
        x, y = w.loader[0]
        tiny = [(x[:WARMUP_EXAMPLES], y[:WARMUP_EXAMPLES])]
        case.prepare(Workload(w.model, tiny))()
    thunk = case.prepare(w)
    gc.collect()
    base = _peak_rss_mib()
    thunk()
    return _peak_rss_mib() - base


def measure_memory(name: str) -> dict[str, float]:
    """Cold and warm peak growth of ``name``, each in a fresh subprocess."""
    out = {}
    for key, flags in (("cold_mib", []), ("warm_mib", ["--memory-warm"])):
        cmd = [sys.executable, "-m", "benchmarks.bench_core", "--memory-case", name]
        done = subprocess.run(
            cmd + flags, cwd=ROOT, capture_output=True, text=True, check=True
        )
        out[key] = float(done.stdout.strip().splitlines()[-1])
    return out


# -- profile --------------------------------------------------------------------
def profile_case(name: str, rows: int = 25) -> None:
    """Print the operators that dominate one warm run of ``name``."""
    w = make_workload()
    thunk = CASE_BY_NAME[name].prepare(w)
    thunk()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        thunk()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# -- report ---------------------------------------------------------------------
def check(value: float | None, target: float | None, strict: bool = False) -> str:
    if value is None or target is None:
        return "-"
    ok = value < target if strict else value <= target
    return "pass" if ok else "FAIL"


def summarize(
    seconds: dict[str, list[float]], memory: dict[str, dict[str, float]], err: float
) -> list[dict[str, Any]]:
    """One row per timed case, then the peak-memory and the agreement rows."""
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    rows = []
    for name, secs in seconds.items():
        case = CASE_BY_NAME[name]
        ratio = min_ratio = None
        if case.baseline:
            ratio = medians[name] / medians[case.baseline]
            min_ratio = min(secs) / min(seconds[case.baseline])
        rows.append(
            {
                "case": name,
                "median_s": medians[name],
                "min_s": min(secs),
                "max_s": max(secs),
                "baseline": case.baseline,
                "ratio": ratio,
                "min_ratio": min_ratio,
                "target": case.target,
                "status": check(ratio, case.target),
            }
        )
    ours, ref = memory[MEMORY_CASE], memory[MEMORY_BASELINE]
    ratio = ours["cold_mib"] / ref["cold_mib"]
    rows.append(
        {
            "case": f"peak_mem {MEMORY_CASE}",
            "peak_growth_mib": ours["cold_mib"],
            "baseline": f"peak_mem {MEMORY_BASELINE}",
            "ratio": ratio,
            "target": MEMORY_TARGET,
            "strict": True,
            "status": check(ratio, MEMORY_TARGET, strict=True),
        }
    )
    rows.append(
        {
            "case": "diag rel. error vs func_diag",
            "relative_error": err,
            "baseline": None,
            "ratio": None,
            "target": DIAG_RTOL,
            "strict": True,
            "status": check(err, DIAG_RTOL, strict=True),
        }
    )
    return rows


def print_report(
    rows: list[dict[str, Any]],
    seconds: dict[str, list[float]],
    memory: dict[str, dict[str, float]],
) -> None:
    print("\nAll timed runs (s), round-robin order:\n")
    timings = [
        [
            row["case"],
            " ".join(f"{s:.3f}" for s in seconds[row["case"]]),
            f"{row['max_s'] / row['min_s']:.2f}",
            "-" if row["min_ratio"] is None else f"{row['min_ratio']:.2f}",
        ]
        for row in rows
        if "median_s" in row
    ]
    print(markdown(["case", "runs", "max/min", "ratio of minimums"], timings))
    noisy = [t[0] for t in timings if float(t[2]) > NOISY_SPREAD]
    if noisy:
        print(
            f"\nNOISY: max/min > {NOISY_SPREAD} for {', '.join(noisy)}; something "
            "else probably competed for the CPUs (with every core in use, a "
            "descheduled OpenMP thread stalls the others). Compare the ratio of "
            "minimums, or re-run on a quiet machine."
        )
    print(
        "\nPeak RSS growth (MiB) over the baseline, one fresh process per cell; "
        f"'warm': after a run on {WARMUP_EXAMPLES} examples:\n"
    )
    ref = memory[MEMORY_BASELINE]
    mem = [
        [name]
        + [f"{m[k]:.1f} ({m[k] / ref[k]:.2f} x)" for k in ("cold_mib", "warm_mib")]
        for name, m in memory.items()
    ]
    print(markdown(["case", "cold", "warm"], mem))
    print("\nSummary (ratio = median / median of the case after 'x'):\n")
    table = []
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        if "median_s" in row:
            value = f"{row['median_s']:.4f}"
        elif "peak_growth_mib" in row:
            value = f"({row['peak_growth_mib']:.1f} MiB)"
        else:
            value, ratio = "-", f"{row['relative_error']:.1e}"
        if row["baseline"]:
            ratio += f" x {row['baseline']}"
        op = "<" if row.get("strict") else "<="
        target = "-" if row["target"] is None else f"{op} {row['target']}"
        table.append([row["case"], value, ratio, target, row["status"]])
    print(markdown(["case", "median s", "ratio", "target", "pass/fail"], table))


def meta(repeats: int) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "torch": torch.__version__,
        "nnfim": nnfim.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "repeats": repeats,
        "loadavg_start": os.getloadavg(),
        "seed": SEED,
        "workload": {
            "sizes": SIZES,
            "n_examples": N_EXAMPLES,
            "batch_size": BATCH_SIZE,
            "func_chunk": FUNC_CHUNK,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REPEATS} timed rounds"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results")
    parser.add_argument(
        "--memory-case", choices=sorted(CASE_BY_NAME), help=argparse.SUPPRESS
    )
    parser.add_argument("--memory-warm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile", choices=sorted(CASE_BY_NAME), help="profile one case and exit"
    )
    args = parser.parse_args(argv)

    if args.memory_case:
        print(memory_child(args.memory_case, args.memory_warm))
        return 0
    if args.profile:
        profile_case(args.profile)
        return 0

    repeats = args.repeats
    if repeats is None:
        repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    w = make_workload()
    info = meta(repeats)
    print(
        f"nnfim core benchmark  {info['date']}  torch {info['torch']}  "
        f"threads {info['threads']}  repeats {repeats} (+1 warm-up)"
    )
    print(
        f"MLP {'-'.join(map(str, SIZES))}, {N_EXAMPLES} examples, "
        f"batches of {BATCH_SIZE}, C = {N_CLASSES}"
    )
    seconds, outputs = time_cases(w, CASES, repeats)
    err = relative_error(w, outputs["nnfim_diag"], outputs["func_diag"])
    print(f"\nnnfim diag vs torch.func diag: relative error {err:.2e}")
    memory = {name: measure_memory(name) for name in (MEMORY_BASELINE, MEMORY_CASE)}
    rows = summarize(seconds, memory, err)
    print_report(rows, seconds, memory)
    info["loadavg_end"] = os.getloadavg()

    result = {
        "seconds": seconds,
        "memory": memory,
        "diag_relative_error": err,
        "summary": rows,
    }
    finish(info, result, args.out, THREADS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
