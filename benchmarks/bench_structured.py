"""Structured Fisher matrices against peer libraries, measured side by side.

Run ``make bench-structured`` (``.bench-venv/bin/python -m
benchmarks.bench_structured``; ``make bench-env`` installs the peers:
NNGeometry, BackPACK, curvlinops). ``--help`` lists the options.

Every (case, library) runs in a fresh subprocess: it builds the workload, runs
the case once as a warm-up (its peak memory and its result are recorded), then
``--inner`` timed runs. The subprocesses are started round-robin, one per case
per round, for ``--rounds`` rounds, so that load from elsewhere hits every case
alike; the table reports medians over all timed runs and ratios of medians.
Results are compared after aligning each library's conventions with nnfim's
(mean over examples, exact Fisher of ``classif_logits``, KFAC-expand).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._common import finish, floor_c, markdown

SEED = 0
#: seed of the probe vector ``v`` of every ``mv``
PROBE_SEED = 1
THREADS = 2
N_CLASSES = 10
MLP_SIZES = (784, 256, 256, 10)
MLP_EXAMPLES, MLP_BATCH = 2048, 256
CNN_EXAMPLES, CNN_BATCH = 1024, 128
NTK_SIZES = (64, 32, 10)
NTK_EXAMPLES, NTK_BATCH = 256, 64
DEFAULT_ROUNDS, QUICK_ROUNDS = 3, 1
DEFAULT_INNER = 2
#: a case whose slowest timed run exceeds its fastest by this factor is flagged
NOISY_SPREAD = 2.0
#: relative error above which a peer is reported as disagreeing
AGREE_RTOL = 1e-3
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "structured.json"

Thunk = Callable[[], Any]
Convert = Callable[[Any], torch.Tensor | None]
Batches = list[tuple[torch.Tensor, torch.Tensor]]


# -- workloads ---------------------------------------------------------------------
@dataclass
class Workload:
    """A model, its data as a list of ``(x, y)`` batches, and the example count."""

    kind: str
    model: nn.Module
    batches: Batches

    @property
    def n_examples(self) -> int:
        return sum(x.shape[0] for x, _ in self.batches)

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn(pool: nn.Module | None = None) -> nn.Sequential:
    """The CNN; ``pool`` replaces ``AdaptiveAvgPool2d(4)`` (same function needed)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        pool if pool is not None else nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(512, N_CLASSES),
    )


def make_workload(kind: str, seed: int = SEED) -> Workload:
    """``mlp``, ``cnn`` or ``ntk``: same model weights and data in every process."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    if kind == "mlp":
        model: nn.Module = _mlp(MLP_SIZES)
        x = torch.randn(MLP_EXAMPLES, MLP_SIZES[0])
        batch = MLP_BATCH
    elif kind == "cnn":
        model = cnn()
        x = torch.randn(CNN_EXAMPLES, 3, 32, 32)
        batch = CNN_BATCH
    elif kind == "ntk":
        model = _mlp(NTK_SIZES)
        x = torch.randn(NTK_EXAMPLES, NTK_SIZES[0])
        batch = NTK_BATCH
    else:
        raise ValueError(kind)
    y = torch.randint(0, N_CLASSES, (x.shape[0],))
    return Workload(kind, model, list(zip(x.split(batch), y.split(batch), strict=True)))


def probe(model: nn.Module) -> dict[str, torch.Tensor]:
    """The vector ``v`` of every ``mv``: parameter name -> tensor, seeded."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return {k: torch.randn(p.shape, generator=gen) for k, p in model.named_parameters()}


def flat(model: nn.Module, by_name: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate in ``named_parameters`` order: the common layout of results."""
    return torch.cat([by_name[k].reshape(-1) for k, _ in model.named_parameters()])


def floor_thunk(w: Workload) -> Thunk:
    """Per batch: one forward, then C ``autograd.grad`` passes to the parameters."""
    return floor_c(w.model, w.batches, N_CLASSES)


# -- nnfim --------------------------------------------------------------------------
def nnfim_kfac(w: Workload, ekfac: bool = False) -> tuple[Thunk, Convert]:
    import nnfim

    lc = nnfim.LayerCollection.from_model(w.model)
    v = nnfim.PVector(lc, probe(w.model))

    def run() -> Any:
        if ekfac:  # the refit reuses the K-FAC pass's layer inputs and gradients
            fim = nnfim.FIM(
                w.model, w.batches, representation=nnfim.PMatEKFAC, ekfac_refit=True
            )
        else:
            fim = nnfim.FIM(w.model, w.batches, representation=nnfim.PMatKFAC)
        return fim.mv(v)

    return run, lambda out: flat(w.model, out.to_dict())


def nnfim_ntk(w: Workload) -> tuple[Thunk, Convert]:
    import nnfim

    return lambda: nnfim.NTK(w.model, w.batches), lambda out: out.data


# -- NNGeometry ---------------------------------------------------------------------
def nngeometry_loader(w: Workload) -> Any:
    """A DataLoader (NNGeometry counts examples with ``len(loader.sampler)``).

    It hands out slices of the stored tensors (``__getitems__``, no collation):
    a default ``TensorDataset`` loader would add ~20-50 ms of indexing and
    collating per pass that the other libraries, reading a list, do not pay.
    """
    from torch.utils.data import DataLoader, TensorDataset

    class Slices(TensorDataset):
        def __getitems__(self, index: list[int]) -> list[torch.Tensor]:
            sl = slice(index[0], index[-1] + 1)
            return [t[sl].clone() for t in self.tensors]

    x = torch.cat([x for x, _ in w.batches])
    y = torch.cat([y for _, y in w.batches])
    size = w.batches[0][0].shape[0]
    return DataLoader(Slices(x, y), batch_size=size, collate_fn=lambda b: b)


def nngeometry_vector(w: Workload) -> Any:
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PVector

    lc = LayerCollection.from_model(w.model)
    v = probe(w.model)
    return PVector(
        lc,
        dict_repr={
            layer: tuple(v[f"{layer}.{p}"] for p in ("weight", "bias"))
            for layer in lc.layers
        },
    )


def nngeometry_flat(w: Workload, out: Any) -> torch.Tensor:
    by_layer = out.to_dict()
    by_name = {
        f"{layer}.{p}": t
        for layer, ts in by_layer.items()
        for p, t in zip(("weight", "bias"), ts, strict=False)
    }
    return flat(w.model, by_name)


def nngeometry_kfac(w: Workload, ekfac: bool = False) -> tuple[Thunk, Convert]:
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatEKFAC, PMatKFAC

    loader, v = nngeometry_loader(w), nngeometry_vector(w)

    def run() -> Any:
        if ekfac:
            fim = FIM(w.model, loader, PMatEKFAC, variant="classif_logits")
            fim.update_diag(loader)
        else:
            fim = FIM(w.model, loader, PMatKFAC, variant="classif_logits")
        return fim.mv(v)

    return run, lambda out: nngeometry_flat(w, out)


def nngeometry_ntk(w: Workload) -> tuple[Thunk, Convert]:
    from nngeometry.metrics import FIM
    from nngeometry.object import FMatDense

    loader = nngeometry_loader(w)

    def run() -> Any:
        return FIM(w.model, loader, FMatDense, variant="regression")

    return run, lambda out: out.data


# -- curvlinops ---------------------------------------------------------------------
def curvlinops_kfac(w: Workload, ekfac: bool = False) -> tuple[Thunk, Convert]:
    """Exact ("type-2") Fisher of the mean cross-entropy, KFAC-expand, bias joint."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    cls = EKFACLinearOperator if ekfac else KFACLinearOperator
    params = w.params
    v = list(probe(w.model).values())

    def run() -> Any:
        op = cls(
            w.model,
            nn.CrossEntropyLoss(),
            params,
            w.batches,
            fisher_type="type-2",
            kfac_approx="expand",
            separate_weight_and_bias=False,
            # both known here: skip the extra passes that would infer them
            num_data=w.n_examples,
            num_per_example_loss_terms=1,
            check_deterministic=False,
        )
        return op @ v

    def convert(out: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in out])

    return run, convert


# -- BackPACK -----------------------------------------------------------------------
def backpack_kfac(w: Workload) -> tuple[Thunk, Convert]:
    """KFLR (exact loss Hessian) factors of every batch, averaged, then ``G V A``.

    BackPACK has no ``AdaptiveAvgPool2d``; the CNN uses ``AvgPool2d(8)``, the
    same function on 32 x 32 inputs, with the same parameters.
    """
    from backpack import backpack, extend
    from backpack.extensions import KFLR

    # BackPACK's hooks: harmless here (the inputs do not require gradients)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    model = w.model
    if w.kind == "cnn":
        state = model.state_dict()
        model = cnn(nn.AvgPool2d(8))
        model.load_state_dict(state)
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    params = list(model.parameters())
    v = list(probe(model).values())

    def run() -> list[torch.Tensor]:
        acc: list[list[torch.Tensor]] = []
        for x, y in w.batches:
            loss = loss_fn(model(x), y)
            with backpack(KFLR()):
                loss.backward()
            for i, p in enumerate(params):
                if len(acc) <= i:
                    acc.append([f.clone() for f in p.kflr])
                else:
                    for a, f in zip(acc[i], p.kflr, strict=True):
                        a.add_(f)
        out = []
        for factors, vec in zip(acc, v, strict=True):
            g = factors[0] / len(w.batches)
            if len(factors) == 1:
                out.append(g @ vec)
            else:
                a = factors[1] / len(w.batches)
                out.append((g @ vec.reshape(vec.shape[0], -1) @ a).reshape(vec.shape))
        return out

    return run, lambda out: torch.cat([t.reshape(-1) for t in out])


# -- torch.func ---------------------------------------------------------------------
def func_ntk(w: Workload) -> tuple[Thunk, Convert]:
    """``vmap(jacrev)`` per batch, then one einsum per parameter over all examples."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: p.detach() for k, p in w.model.named_parameters()}

    def f(prm: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(w.model, prm, (x[None],))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0))

    def run() -> torch.Tensor:
        parts = [jac(params, x) for x, _ in w.batches]
        total = None
        for k in params:
            j = torch.cat([p[k] for p in parts]).flatten(2)
            g = torch.einsum("icp,jdp->cidj", j, j)
            total = g if total is None else total + g
        assert total is not None
        return total

    return run, lambda out: out


# -- cases --------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One library on one task; ``group`` names the task, ``lib`` the library."""

    group: str
    lib: str
    workload: str
    prepare: Callable[[Workload], tuple[Thunk, Convert]]

    @property
    def name(self) -> str:
        return f"{self.group}/{self.lib}"


def _floor(w: Workload) -> tuple[Thunk, Convert]:
    return floor_thunk(w), lambda out: None


def _ekfac(fn: Callable[..., tuple[Thunk, Convert]]) -> Any:
    return lambda w: fn(w, ekfac=True)


CASES = (
    Case("mlp_kfac", "floor", "mlp", _floor),
    Case("mlp_kfac", "nnfim", "mlp", nnfim_kfac),
    Case("mlp_kfac", "nngeometry", "mlp", nngeometry_kfac),
    Case("mlp_kfac", "backpack", "mlp", backpack_kfac),
    Case("mlp_kfac", "curvlinops", "mlp", curvlinops_kfac),
    Case("mlp_ekfac", "nnfim", "mlp", _ekfac(nnfim_kfac)),
    Case("mlp_ekfac", "nngeometry", "mlp", _ekfac(nngeometry_kfac)),
    Case("mlp_ekfac", "curvlinops", "mlp", _ekfac(curvlinops_kfac)),
    Case("cnn_kfac", "floor", "cnn", _floor),
    Case("cnn_kfac", "nnfim", "cnn", nnfim_kfac),
    Case("cnn_kfac", "nngeometry", "cnn", nngeometry_kfac),
    Case("cnn_kfac", "curvlinops", "cnn", curvlinops_kfac),
    Case("cnn_kfac", "backpack", "cnn", backpack_kfac),
    Case("ntk", "floor", "ntk", _floor),
    Case("ntk", "nnfim", "ntk", nnfim_ntk),
    Case("ntk", "nngeometry", "ntk", nngeometry_ntk),
    Case("ntk", "torch.func", "ntk", func_ntk),
)
CASE_BY_NAME = {case.name: case for case in CASES}
#: the floor of a group (EKFAC's KFAC pass has the same floor; it makes two passes)
FLOOR = {
    "mlp_kfac": "mlp_kfac/floor",
    "mlp_ekfac": "mlp_kfac/floor",
    "cnn_kfac": "cnn_kfac/floor",
    "ntk": "ntk/floor",
}
DESCRIPTION = {
    "mlp_kfac": "MLP 784-256-256-10, 2,048 examples / 256: KFAC factors + one mv",
    "mlp_ekfac": "MLP 784-256-256-10, 2,048 examples / 256: EKFAC, diagonal refit, one mv",
    "cnn_kfac": "CNN 3-16-32 conv, pool 4, linear 10, 1,024 x 3x32x32 / 128: KFAC + one mv",
    "ntk": "MLP 64-32-10, 256 examples / 64: NTK Gram (2,560 x 2,560)",
}


# -- child: one case in this fresh process ------------------------------------------
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
    where that fails, the baseline is the peak so far, as in ``bench_core``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS")
    except OSError:
        return _status_mib("VmHWM")


def run_child(name: str, inner: int, save: Path | None) -> dict[str, Any]:
    """Warm-up (peak memory, result), then ``inner`` timed runs of ``name``."""
    case = CASE_BY_NAME[name]
    w = make_workload(case.workload)
    thunk, convert = case.prepare(w)
    gc.collect()
    base = _reset_peak()
    start = time.perf_counter()
    out = thunk()
    warmup = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    if save is not None:
        result = convert(out)
        if result is not None:
            torch.save(result.detach().clone(), save)
    del out
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


def spawn(name: str, inner: int, save: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_structured", "--child", name]
    cmd += ["--inner", str(inner)]
    if save is not None:
        cmd += ["--save", str(save)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_cases(
    cases: list[Case], rounds: int, inner: int, tmp: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Path]]:
    """Round-robin: each round starts one fresh process per case, in turn.

    Returns:
        Timed seconds per case, peak memory growth (MiB) per case and round,
        and the files holding the first round's warm-up results.
    """
    seconds: dict[str, list[float]] = {c.name: [] for c in cases}
    peaks: dict[str, list[float]] = {c.name: [] for c in cases}
    saved: dict[str, Path] = {}
    for r in range(rounds):
        for case in cases:
            save = tmp / f"{case.name.replace('/', '__')}.pt" if r == 0 else None
            res = spawn(case.name, inner, save)
            seconds[case.name] += res["seconds"]
            if res["peak_mib"] is not None:
                peaks[case.name].append(res["peak_mib"])
            if save is not None and save.exists():
                saved[case.name] = save
            print(
                f"  round {r + 1}/{rounds}  {case.name:<24} "
                + " ".join(f"{s:.3f}" for s in res["seconds"])
                + f"  (warm-up {res['warmup_s']:.3f} s)",
                flush=True,
            )
    return seconds, peaks, saved


# -- agreement ----------------------------------------------------------------------
def _kron_mv_separate(
    w: Workload,
    a_of: Callable[[str], torch.Tensor],
    g_of: Callable[[str], torch.Tensor],
    bias_scale: Callable[[str], float],
) -> torch.Tensor:
    """``G V_w A`` for weights and ``s G v_b`` for biases, no weight-bias terms."""
    v, out = probe(w.model), {}
    for name, module in w.model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        vw = v[f"{name}.weight"]
        g = g_of(name)
        out[f"{name}.weight"] = (g @ vw.reshape(vw.shape[0], -1) @ a_of(name)).reshape(
            vw.shape
        )
        out[f"{name}.bias"] = bias_scale(name) * (g @ v[f"{name}.bias"])
    return flat(w.model, out)


def backpack_reference(w: Workload) -> torch.Tensor:
    """nnfim's factors in BackPACK's conventions, applied to the probe vector.

    BackPACK treats weight and bias as two blocks (no cross terms): the weight
    gets ``A`` without nnfim's constant-1 row and column, the bias ``G`` alone.
    For a Conv2d its ``A`` sums the patches over the ``T`` output positions
    (``T`` x nnfim's KFAC-expand ``A``) and its ``G`` sums the output gradients
    over positions before the outer product (nnfim's KFAC-reduce ``G``).
    """
    import nnfim

    expand = nnfim.FIM(w.model, w.batches, representation=nnfim.PMatKFAC)
    reduce = nnfim.FIM(
        w.model, w.batches, representation=nnfim.PMatKFAC, kfac_convention="reduce"
    )
    modules = dict(w.model.named_modules())

    def positions(name: str) -> int:
        if not isinstance(modules[name], nn.Conv2d):
            return 1
        # same padding, stride 1: as many output positions as input pixels
        return 32 * 32

    def a_of(name: str) -> torch.Tensor:
        return expand.factors[name][0][0, :-1, :-1] * positions(name)

    def g_of(name: str) -> torch.Tensor:
        return reduce.factors[name][1][0]

    return _kron_mv_separate(w, a_of, g_of, lambda name: 1.0)


def agreement(cases: list[Case], saved: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Relative error of each peer's result against nnfim's, conventions aligned."""
    out: dict[str, dict[str, Any]] = {}
    for case in cases:
        if case.lib in ("nnfim", "floor") or case.name not in saved:
            continue
        ours = saved.get(f"{case.group}/nnfim")
        if ours is None:
            continue
        peer = torch.load(saved[case.name])
        if case.lib == "backpack":
            ref = backpack_reference(make_workload(case.workload))
            against = "nnfim factors in BackPACK's convention"
        else:
            ref = torch.load(ours)
            against = "nnfim"
        err = float((peer - ref).norm() / ref.norm())
        out[case.name] = {"relative_error": err, "against": against}
    return out


# -- report -------------------------------------------------------------------------
def summarize(
    cases: list[Case],
    seconds: dict[str, list[float]],
    peaks: dict[str, list[float]],
    agree: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per case, with the group's target on nnfim's row."""
    med = {name: statistics.median(s) for name, s in seconds.items()}
    rows = []
    for case in cases:
        group = [c for c in cases if c.group == case.group]
        peers = [c.name for c in group if c.lib not in ("nnfim", "floor")]
        fastest = min(peers, key=lambda n: med[n]) if peers else None
        floor = FLOOR.get(case.group)
        if floor not in med:
            floor = None
        secs = seconds[case.name]
        row: dict[str, Any] = {
            "case": case.name,
            "group": case.group,
            "lib": case.lib,
            "median_s": med[case.name],
            "min_s": min(secs),
            "max_s": max(secs),
            "spread": max(secs) / min(secs),
            "fastest_peer": fastest,
            "ratio_fastest_peer": med[case.name] / med[fastest] if fastest else None,
            "min_ratio_fastest_peer": (
                min(secs) / min(seconds[fastest]) if fastest else None
            ),
            "ratio_floor": med[case.name] / med[floor] if floor else None,
            "peak_mib": statistics.median(peaks[case.name])
            if peaks[case.name]
            else None,
            "relative_error": agree.get(case.name, {}).get("relative_error"),
            "target": None,
            "status": "-",
        }
        if case.lib == "nnfim":
            row.update(target_of(case.group, med, seconds, fastest, floor))
        rows.append(row)
    return rows


def target_of(
    group: str,
    med: dict[str, float],
    seconds: dict[str, list[float]],
    fastest: str | None,
    floor: str | None,
) -> dict[str, Any]:
    """The issue's targets, as a bound in seconds on nnfim's median."""
    ours = f"{group}/nnfim"
    if group == "mlp_ekfac":
        ref = f"{group}/nngeometry"
        if ref not in med:
            return {}
        bound, text = med[ref] / 3, "<= 1/3 x nngeometry"
        min_bound = min(seconds[ref]) / 3
    else:
        if fastest is None:
            return {}
        bound, text = 0.5 * med[fastest], "<= 0.5 x fastest peer"
        min_bound = 0.5 * min(seconds[fastest])
        if floor is not None and 1.1 * med[floor] > bound:
            bound, text = 1.1 * med[floor], "<= 1.1 x floor"
            min_bound = 1.1 * min(seconds[floor])
    return {
        "target": text,
        "target_s": bound,
        "status": "pass" if med[ours] <= bound else "FAIL",
        "status_min": "pass" if min(seconds[ours]) <= min_bound else "FAIL",
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(rows: list[dict[str, Any]], seconds: dict[str, list[float]]) -> None:
    for group in dict.fromkeys(r["group"] for r in rows):
        print(f"\n### {group}: {DESCRIPTION[group]}\n")
        lines = []
        for r in (r for r in rows if r["group"] == group):
            flag = " NOISY" if r["spread"] > NOISY_SPREAD else ""
            lines.append(
                [
                    r["lib"],
                    f"{r['median_s']:.4f}{flag}",
                    _fmt(r["ratio_fastest_peer"], ".2f"),
                    _fmt(r["ratio_floor"], ".2f"),
                    _fmt(r["peak_mib"], ".1f"),
                    _fmt(r["relative_error"], ".1e")
                    + (
                        " DISAGREES"
                        if (r["relative_error"] or 0.0) > AGREE_RTOL
                        else ""
                    ),
                    r["target"] or "-",
                    r["status"]
                    + (
                        f" (min: {r['status_min']})"
                        if r.get("status_min", r["status"]) != r["status"]
                        else ""
                    ),
                ]
            )
        print(
            markdown(
                [
                    "library",
                    "median s",
                    "x fastest peer",
                    "x floor",
                    "peak MiB",
                    "rel. err vs nnfim",
                    "target",
                    "pass/fail",
                ],
                lines,
            )
        )
    print("\nAll timed runs (s), round-robin order:\n")
    timing = [
        [
            r["case"],
            " ".join(f"{s:.3f}" for s in seconds[r["case"]]),
            f"{r['spread']:.2f}",
            _fmt(r["min_ratio_fastest_peer"], ".2f"),
        ]
        for r in rows
    ]
    print(markdown(["case", "runs", "max/min", "min / min of fastest peer"], timing))
    bad = [r["case"] for r in rows if (r["relative_error"] or 0.0) > AGREE_RTOL]
    if bad:
        print(
            f"\nDISAGREES: relative error > {AGREE_RTOL} for {', '.join(bad)}: the "
            "two libraries do not compute the same matrix (a bug, or a convention "
            "left unaligned)."
        )
    noisy = [r["case"] for r in rows if r["spread"] > NOISY_SPREAD]
    if noisy:
        print(
            f"\nNOISY: max/min > {NOISY_SPREAD} for {', '.join(noisy)}; something "
            "else probably competed for the CPUs. Compare the ratio of minimums, or "
            "re-run on a quiet machine."
        )


def nnfim_source() -> dict[str, Any]:
    """Where the children import nnfim from, and its git state.

    nnfim may change while a run lasts (another checkout, an editable
    install): the report compares this at the start and at the end.
    """
    import nnfim

    path = Path(nnfim.__file__).resolve().parent

    def git(*args: str) -> str | None:
        done = subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True
        )
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", ".")
    return {
        "path": str(path),
        "commit": git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        # changes not committed yet, by content
        "diff_sha1": hashlib.sha1(
            (git("diff", "HEAD", "--", ".") or "").encode()
        ).hexdigest()[:12],
    }


def meta(rounds: int, inner: int) -> dict[str, Any]:
    versions = {"torch": torch.__version__}
    for mod, dist in (
        ("nnfim", "nnfim"),
        ("nngeometry", "nngeometry"),
        ("backpack", "backpack-for-pytorch"),
        ("curvlinops", "curvlinops-for-pytorch"),
    ):
        try:
            from importlib.metadata import version

            versions[mod] = version(dist)
        except Exception:  # noqa: BLE001 - a peer that is not installed
            versions[mod] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "versions": versions,
        "nnfim_source": nnfim_source(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": THREADS,
        "dtype": "float32",
        "rounds": rounds,
        "inner": inner,
        "loadavg_start": os.getloadavg(),
        "seed": SEED,
    }


# -- profile ------------------------------------------------------------------------
def profile_case(name: str, rows: int = 25) -> None:
    """Print the operators that dominate one warm run of ``name``."""
    case = CASE_BY_NAME[name]
    thunk, _ = case.prepare(make_workload(case.workload))
    thunk()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        thunk()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="round-robin rounds")
    parser.add_argument(
        "--inner",
        type=int,
        default=DEFAULT_INNER,
        help="timed runs per process, after its warm-up",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} round")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["*"],
        help="glob patterns on case names, e.g. 'mlp_*' 'ntk/*'",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results")
    parser.add_argument(
        "--profile", choices=sorted(CASE_BY_NAME), help="profile one case and exit"
    )
    parser.add_argument("--child", choices=sorted(CASE_BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    if args.child:
        print(json.dumps(run_child(args.child, args.inner, args.save)))
        return 0
    if args.profile:
        profile_case(args.profile)
        return 0

    rounds = args.rounds
    if rounds is None:
        rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    if rounds < 1 or args.inner < 1:
        parser.error("--rounds and --inner must be at least 1")
    cases = [c for c in CASES if any(fnmatch.fnmatch(c.name, p) for p in args.cases)]
    if not cases:
        parser.error(f"no case matches {args.cases}")
    info = meta(rounds, args.inner)
    print(
        f"nnfim structured benchmark  {info['date']}  "
        + "  ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"  threads {THREADS}  {rounds} rounds x (1 warm-up + {args.inner} timed)"
        " per case, one fresh process per case and round"
    )
    src = info["nnfim_source"]
    print(
        f"nnfim from {src['path']} at {str(src['commit'])[:10]}"
        + (" + uncommitted changes" if src["dirty"] else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        seconds, peaks, saved = time_cases(cases, rounds, args.inner, Path(tmp))
        agree = agreement(cases, saved)
    rows = summarize(cases, seconds, peaks, agree)
    print_report(rows, seconds)
    info["loadavg_end"] = os.getloadavg()
    info["nnfim_source_end"] = nnfim_source()
    if info["nnfim_source_end"] != info["nnfim_source"]:
        print(
            "\nWARNING: nnfim's source changed during the run "
            f"({info['nnfim_source']} -> {info['nnfim_source_end']}): the cases "
            "may have measured different code. Re-run."
        )
    result = {
        "seconds": seconds,
        "peak_mib": peaks,
        "agreement": agree,
        "summary": rows,
    }
    finish(info, result, args.out, THREADS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
