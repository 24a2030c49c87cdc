"""The benchmark suite's machinery: cases, fresh processes, timing, agreement.

A :class:`Group` is one quantity on one workload (``mlp_diag``: the exact
diagonal Fisher of the MLP); a :class:`Case` is one library computing it. Every
case runs in a fresh subprocess (``--child``): it builds the workload, runs the
case once as a warm-up (its result is recorded), once more for its peak memory,
then ``inner`` timed runs. The subprocesses are started round-robin, one per case per
round, for ``rounds`` rounds, so that load from elsewhere hits every case alike;
the report gives medians over all timed runs and ratios of medians measured in
the same run. Results are compared after aligning each library's conventions
with nnfim's (mean over examples, exact Fisher of ``classif_logits``,
KFAC-expand): see ``benchmarks/README.md``.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.workloads import Workload, make_workload

Thunk = Callable[[], Any]
Convert = Callable[[Any], torch.Tensor | None]
Prepare = Callable[[Workload], tuple[Thunk, Convert]]

#: relative error above which a library is reported as disagreeing
AGREE_RTOL = 1e-3
#: a case whose slowest timed run exceeds its fastest by this factor is flagged
NOISY_SPREAD = 2.0
ROOT = Path(__file__).resolve().parent.parent
#: libraries that are not peers: the floor and nnfim itself
NOT_PEERS = ("floor", "nnfim")


@dataclass(frozen=True)
class Group:
    """One quantity on one workload, computed by several libraries.

    Attributes:
        name: short id, e.g. ``"mlp_diag"``.
        workload: a key of ``benchmarks.workloads.SPECS``.
        description: what every library computes, for the table.
        floor_outputs: output directions of the floor (one forward, then that
            many backward passes per batch); ``None``: no floor row.
        reference: when set, every library (nnfim included) is compared with
            this result, computed in the parent; else peers are compared with
            nnfim's result.
        against: what ``reference`` is, for the report.
        rtol: relative error above which a result is flagged.
        agreement_note: why there is no agreement figure, where there is none.
        compare: whether results are compared at all (no: Monte-Carlo
            results with no exact reference).
        quick: part of the ``--quick`` set.
        target: whether the issue's rule applies (no: a diagnostic group).
    """

    name: str
    workload: str
    description: str
    floor_outputs: int | None = None
    reference: Callable[[Workload], torch.Tensor] | None = None
    against: str = "nnfim"
    rtol: float = AGREE_RTOL
    agreement_note: str = ""
    compare: bool = True
    quick: bool = False
    target: bool = True


@dataclass(frozen=True)
class Case:
    """One library on one group.

    Attributes:
        group: the group.
        lib: ``"floor"``, ``"nnfim"``, or a peer (``"nngeometry"``, ...).
        prepare: builds what the timer must not see and returns the timed
            thunk and a converter of its result to the group's common layout
            (``None`` for no result).
        needs: a module the case imports (a peer); missing: "not installed".
        reference: compare this case with this result instead (a convention
            no nnfim option reproduces, e.g. BackPACK's KFLR blocks).
        against: what ``reference`` is.
        quick: part of ``--quick`` when its group is (no: too slow for it).
    """

    group: Group
    lib: str
    prepare: Prepare
    needs: str | None = None
    reference: Callable[[Workload], torch.Tensor] | None = None
    against: str = ""
    quick: bool = True

    @property
    def name(self) -> str:
        return f"{self.group.name}/{self.lib}"

    @property
    def installed(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None


def floor_thunk(w: Workload, passes: int) -> Thunk:
    """Per batch: one forward, then ``passes`` ``autograd.grad`` calls to the parameters.

    The output directions are the first ``passes`` one-hot vectors.
    """
    params = [p for p in w.model.parameters() if p.requires_grad]
    eye = torch.eye(w.n_classes)[:passes]

    def run() -> None:
        for x, _ in w.batches:
            out = w.model(x)
            for e in eye:
                torch.autograd.grad(out, params, e.expand_as(out), retain_graph=True)

    return run


def floor_case(group: Group) -> Case:
    """Per batch, one forward then ``group.floor_outputs`` backward passes."""
    passes = group.floor_outputs
    assert passes is not None

    def prepare(w: Workload) -> tuple[Thunk, Convert]:
        return floor_thunk(w, passes), lambda out: None

    return Case(group, "floor", prepare)


# -- child: one case in this fresh process --------------------------------------
def _status_mib(key: str) -> float | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**10
    return None


def _reset_peak() -> float | None:
    """Reset ``VmHWM`` to the current resident size; return the baseline (MiB).

    Writing ``5`` to ``/proc/self/clear_refs`` resets the peak (Linux >= 4.0);
    where that fails, the baseline is the peak so far.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS")
    except OSError:
        return _status_mib("VmHWM")


def _release_free_heap() -> None:
    """Hand freed heap pages back to the system, so resident size is live memory.

    glibc keeps freed blocks (even large ones, once its mmap threshold has
    grown) resident; without this, a run that reuses them would show no peak.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may read low
        pass


#: Bytes of the block every case's process allocates and frees first.
HEAP_PRIME_BYTES = 24 << 20


def prime_heap() -> None:
    """Start every case, nnfim's or not, in the same allocator state.

    nnfim's first CPU pass raises glibc's dynamic mmap and trim thresholds by
    allocating and freeing one 24 MiB block (``nnfim.generator._passes``);
    the peers and the floor gain from the same state (``torch.func``'s CNN
    diagonal: 2.6 to 2.7 s unprimed, 1.7 s primed). Doing it here for every
    case compares the methods, not the heap's history.
    """
    torch.empty(HEAP_PRIME_BYTES, dtype=torch.uint8)


def run_child(case: Case, inner: int, quick: bool, save: Path | None) -> dict[str, Any]:
    """Warm-up (result), one run for peak memory, then ``inner`` timed runs.

    The peak is the resident high-water mark above the resident size just
    before a run that follows the warm-up: one-time costs (imports done on
    first use, thread pools, allocator arenas) count for no library.
    """
    prime_heap()
    w = make_workload(case.group.workload, quick)
    thunk, convert = case.prepare(w)
    start = time.perf_counter()
    out = thunk()
    warmup = time.perf_counter() - start
    if save is not None:
        result = convert(out)
        if result is not None:
            torch.save(result.detach().clone(), save)
    del out
    gc.collect()
    _release_free_heap()
    base = _reset_peak()
    thunk()
    peak = _status_mib("VmHWM")
    seconds = []
    for _ in range(inner):
        gc.collect()
        start = time.perf_counter()
        thunk()
        seconds.append(time.perf_counter() - start)
    return {
        "seconds": seconds,
        "warmup_s": warmup,
        "peak_mib": None if base is None or peak is None else peak - base,
    }


def spawn(
    module: str, case: Case, inner: int, quick: bool, save: Path | None
) -> dict[str, Any]:
    """Run ``case`` in a fresh ``python -m module --child`` process."""
    cmd = [sys.executable, "-m", module, "--child", case.name, "--inner", str(inner)]
    if quick:
        cmd.append("--quick")
    if save is not None:
        cmd += ["--save", str(save)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-4000:] or f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Timings:
    """What the round-robin collected, per case name."""

    seconds: dict[str, list[float]]
    peaks: dict[str, list[float]]
    saved: dict[str, Path]
    errors: dict[str, str]


def time_cases(
    module: str,
    cases: list[Case],
    rounds: int,
    inner: int,
    quick: bool,
    tmp: Path,
    log: Callable[[str], None] = print,
) -> Timings:
    """Round-robin: each round starts one fresh process per case, in turn.

    Floors of the same workload and pass count are one measurement, shared by
    their groups (ratios to it are then consistent across groups). A case
    that fails is reported with its error and not run again.
    """
    t = Timings({c.name: [] for c in cases}, {c.name: [] for c in cases}, {}, {})
    owner: dict[tuple[str, int | None], str] = {}
    alias: dict[str, str] = {}
    for case in cases:
        if case.lib == "floor":
            key = (case.group.workload, case.group.floor_outputs)
            first = owner.setdefault(key, case.name)
            if first != case.name:
                alias[case.name] = first
    for r in range(rounds):
        for case in cases:
            if case.name in t.errors or case.name in alias:
                continue
            save = tmp / f"{case.name.replace('/', '__')}.pt" if r == 0 else None
            res = spawn(module, case, inner, quick, save)
            if "error" in res:
                t.errors[case.name] = res["error"]
                last = res["error"].splitlines()[-1] if res["error"] else ""
                log(f"  round {r + 1}/{rounds}  {case.name:<28} FAILED: {last}")
                continue
            t.seconds[case.name] += res["seconds"]
            if res["peak_mib"] is not None:
                t.peaks[case.name].append(res["peak_mib"])
            if save is not None and save.exists():
                t.saved[case.name] = save
            log(
                f"  round {r + 1}/{rounds}  {case.name:<28} "
                + " ".join(f"{s:.3f}" for s in res["seconds"])
                + f"  (warm-up {res['warmup_s']:.3f} s)"
            )
    for name, first in alias.items():
        t.seconds[name] = t.seconds[first]
        t.peaks[name] = t.peaks[first]
        if first in t.errors:
            t.errors[name] = t.errors[first]
    return t


# -- agreement ------------------------------------------------------------------
def relative_error(result: torch.Tensor, ref: torch.Tensor) -> float:
    """``|result - ref| / |ref|`` in float64; shapes must match."""
    if result.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(result.shape)} vs {tuple(ref.shape)}")
    result, ref = result.double(), ref.double()
    return float((result - ref).norm() / ref.norm())


def agreement(
    cases: list[Case], saved: dict[str, Path], quick: bool
) -> dict[str, dict[str, Any]]:
    """Relative error of each result against its reference, conventions aligned.

    The reference is, in order: the case's own ``reference``, the group's, or
    nnfim's result for the group (then nnfim's own row has no figure).
    """
    out: dict[str, dict[str, Any]] = {}
    refs: dict[str, torch.Tensor] = {}

    def computed(key: str, fn: Callable[[Workload], torch.Tensor], kind: str) -> Any:
        if key not in refs:
            refs[key] = fn(make_workload(kind, quick)).detach()
        return refs[key]

    for case in cases:
        group = case.group
        if case.lib == "floor" or case.name not in saved or not group.compare:
            continue
        if case.reference is not None:
            ref = computed(case.name, case.reference, group.workload)
            against = case.against
        elif group.reference is not None:
            ref = computed(group.name, group.reference, group.workload)
            against = group.against
        elif case.lib != "nnfim" and f"{group.name}/nnfim" in saved:
            ref = torch.load(saved[f"{group.name}/nnfim"], weights_only=True)
            against = "nnfim"
        else:
            continue
        result = torch.load(saved[case.name], weights_only=True)
        try:
            err = relative_error(result, ref)
        except ValueError as e:
            out[case.name] = {"error": str(e), "against": against}
            continue
        out[case.name] = {
            "relative_error": err,
            "against": against,
            "rtol": group.rtol,
            "agrees": err <= group.rtol,
        }
    return out


# -- summary --------------------------------------------------------------------
def target_of(
    ours: float, fastest_peer: float | None, floor: float | None
) -> dict[str, Any]:
    """The issue's rule: at most half the fastest peer, or 1.1 x the floor if higher.

    Without a peer there is no target (the floor only relaxes the peer bound).
    """
    if fastest_peer is None:
        return {"target": None, "target_s": None, "status": "-"}
    bound, text = 0.5 * fastest_peer, "<= 0.5 x fastest peer"
    if floor is not None and 1.1 * floor > bound:
        bound, text = 1.1 * floor, "<= 1.1 x floor"
    return {
        "target": text,
        "target_s": bound,
        "status": "pass" if ours <= bound else "FAIL",
    }


def summarize(
    cases: list[Case], t: Timings, agree: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per case; nnfim's row carries the group's target."""
    med = {name: statistics.median(s) for name, s in t.seconds.items() if s}
    mins = {name: min(s) for name, s in t.seconds.items() if s}
    rows = []
    for case in cases:
        group = [c for c in cases if c.group.name == case.group.name]
        peers = [c.name for c in group if c.lib not in NOT_PEERS and c.name in med]
        fastest = min(peers, key=lambda n: med[n]) if peers else None
        floor: str | None = f"{case.group.name}/floor"
        if floor not in med:
            floor = None
        row: dict[str, Any] = {
            "case": case.name,
            "group": case.group.name,
            "lib": case.lib,
            "installed": case.installed,
            "error": t.errors.get(case.name),
            "median_s": med.get(case.name),
            "min_s": mins.get(case.name),
            "max_s": max(t.seconds[case.name]) if t.seconds[case.name] else None,
            "runs_s": t.seconds[case.name],
            "peak_mib": statistics.median(t.peaks[case.name])
            if t.peaks[case.name]
            else None,
            "fastest_peer": fastest,
            "ratio_fastest_peer": None,
            "min_ratio_fastest_peer": None,
            "ratio_floor": None,
            "target": None,
            "target_s": None,
            "status": "-",
            **{
                k: agree.get(case.name, {}).get(k) for k in ("relative_error", "agrees")
            },
            "against": agree.get(case.name, {}).get("against"),
        }
        if row["median_s"] is not None:
            row["spread"] = row["max_s"] / row["min_s"]
            if fastest:
                row["ratio_fastest_peer"] = row["median_s"] / med[fastest]
                row["min_ratio_fastest_peer"] = row["min_s"] / mins[fastest]
            if floor:
                row["ratio_floor"] = row["median_s"] / med[floor]
            if case.lib == "nnfim" and case.group.target:
                row.update(
                    target_of(
                        row["median_s"],
                        med[fastest] if fastest else None,
                        med[floor] if floor else None,
                    )
                )
                peer_peaks = [
                    statistics.median(t.peaks[n]) for n in peers if t.peaks[n]
                ]
                if peer_peaks and row["peak_mib"] is not None:
                    # the rule: peak memory no worse than the best peer
                    row["ratio_peak_best_peer"] = row["peak_mib"] / min(peer_peaks)
                if fastest and row["status"] != "-":
                    by_min = target_of(
                        row["min_s"], mins[fastest], mins[floor] if floor else None
                    )
                    row["status_min"] = by_min["status"]
        rows.append(row)
    return rows
