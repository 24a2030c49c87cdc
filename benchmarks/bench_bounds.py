"""What the arithmetic leaves for quantities whose targets nnfim misses.

``.venv/bin/python -m benchmarks.bench_bounds [--threads N] [--rounds R]``
(``.bench-venv/bin/python`` adds NNGeometry to the EKFAC table)

- **MC diagonal on the MLP** (``mlp_mc_diag``). A Monte-Carlo diagonal does
  the floor's matrix products (its products of squares replace the weight
  gradients), plus a softmax, a sampled label and squares per batch. This
  times, round-robin, the floor, a hand-written loop that does only that
  (plain ``nn.Sequential`` forward, ``autograd.grad`` to the layer outputs,
  ``addmm_`` of squares into the sums; no hooks, no checks, no library) on
  the loader's batches and on all the data as one batch (what joining the
  batches leaves), and ``nnfim.FIM(..., PMatDiag, fisher_type="mc")``.
  Medians over the rounds.
- **Fisher-vector product** (``mlp_mv``, ``cnn_mv``). Any ``F v`` needs the
  forward-mode product ``J v`` on top of a forward and a backward: as many
  multiply-adds as the suite's floor for these rows (a forward and two
  backward passes), which this prints for the MLP and the CNN from the layer
  shapes. It times, round-robin, that floor, a hand-written ``F v`` on the
  MLP (forward-mode pass, softmax Hessian, one ``autograd.grad``; no hooks,
  no checks) and ``nnfim.FIM(..., PMatImplicit).mv``.
- **EKFAC with the diagonal refit, then one mv, on the MLP** (``mlp_ekfac``,
  whose target is a third of NNGeometry's time). This times, round-robin, a
  hand-written EKFAC that does only the arithmetic (per batch a forward, the
  backward of the ``C - 1`` Fisher directions to the layer outputs by explicit
  products, the factors' symmetric products; then the ``eigh`` of every
  factor, the rotations ``[X, 1] Q_A`` and ``G Q_G`` of the kept inputs and
  gradients, the refit's product of squares and the mv), nnfim, and
  NNGeometry where it is installed. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

import nnfim
from benchmarks.suite import floor_thunk, prime_heap
from benchmarks.workloads import Workload, make_workload, probe
from nnfim.generator._jvp import linear_tangents
from nnfim.generator.rules._registry import xtx
from nnfim.generator.variants import ClassifLogits


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


def hand_mv(
    w: Workload, v: dict[str, torch.Tensor]
) -> Callable[[], list[torch.Tensor]]:
    """The exact Fisher's ``F v`` of a softmax classifier, by hand.

    Per batch: one forward-mode pass (``torch.func.functional_call`` on dual
    parameters, nnfim's Linear tangent that skips an absent input tangent),
    the softmax Hessian on ``J v``, one ``autograd.grad`` to the parameters;
    summed, then divided by the example count. No hooks, checks or library.
    """
    params = dict(w.model.named_parameters())
    tangents = {k: v[k].detach().clone() for k in params}

    def run() -> list[torch.Tensor]:
        acc = [torch.zeros_like(p) for p in params.values()]
        n = 0
        with linear_tangents(w.model):
            for x, _ in w.batches:
                with fwAD.dual_level():
                    duals = {
                        k: fwAD.make_dual(p, tangents[k]) for k, p in params.items()
                    }
                    out, jv = fwAD.unpack_dual(functional_call(w.model, duals, (x,)))
                p = torch.softmax(out.detach(), -1)
                jv = jv.detach()
                u = p * jv - p * (p * jv).sum(-1, keepdim=True)
                for a, g in zip(
                    acc, torch.autograd.grad(out, list(params.values()), u), strict=True
                ):
                    a.add_(g)
                n += x.shape[0]
        return [a.div_(n) for a in acc]

    return run


def hand_ekfac(
    w: Workload, v: dict[str, torch.Tensor]
) -> Callable[[], list[torch.Tensor]]:
    """EKFAC with the refit, then ``F v``, of a Linear/ReLU ``nn.Sequential``, by hand.

    The same arithmetic as nnfim's (the ``C - 1`` directions of
    ``diag(p) - p p^T``, the upper blocks of ``X^T X``, the inputs and gradients
    kept for the refit) with none of its plumbing: no hooks, no checks, no
    sub-batches, no dense blocks. Returns ``F v`` per Linear layer as the
    ``(out, in + 1)`` matrix ``[weight | bias]``.
    """
    names = [k for k, m in w.model.named_children() if isinstance(m, nn.Linear)]
    layers = [w.model.get_submodule(k) for k in names]
    if len(layers) != len(w.model) // 2 + 1:
        raise ValueError("hand_ekfac takes Linear layers with a ReLU between them")
    variant = ClassifLogits()
    vs = [torch.cat([v[f"{k}.weight"], v[f"{k}.bias"][:, None]], 1) for k in names]

    def run() -> list[torch.Tensor]:
        n = 0
        like = layers[0].weight
        a_sum = [like.new_zeros(m.in_features + 1, m.in_features + 1) for m in layers]
        g_sum = [like.new_zeros(m.out_features, m.out_features) for m in layers]
        kept: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
        with torch.no_grad():
            for x, _ in w.batches:
                inputs, masks = [], []
                h = x
                for i, m in enumerate(layers):
                    inputs.append(torch.cat([h, h.new_ones(h.shape[0], 1)], 1))
                    h = torch.addmm(m.bias, h, m.weight.t())
                    if i < len(layers) - 1:
                        masks.append(h > 0)
                        h = h.relu()
                g = variant.fisher_directions(h)  # (C - 1, n, C)
                for i in reversed(range(len(layers))):
                    xb, gb = inputs[i], g.reshape(-1, g.shape[-1])
                    xtx(xb, out=a_sum[i])
                    xtx(gb, out=g_sum[i])
                    kept[i].append((xb, g))
                    if i:
                        g = (g @ layers[i].weight).mul_(masks[i - 1])
                n += x.shape[0]
            out = []
            for i in range(len(layers)):
                q_a = torch.linalg.eigh(a_sum[i] / n)[1]
                q_g = torch.linalg.eigh(g_sum[i] / n)[1]
                s = sum(
                    (g @ q_g).square_().sum(0).t() @ (xb @ q_a).square_()
                    for xb, g in kept[i]
                )
                rotated = q_g.t() @ vs[i] @ q_a
                out.append(q_g @ (rotated * s / n) @ q_a.t())
        return out

    return run


def mv_multiply_adds(kind: str) -> tuple[int, int, int]:
    """Multiply-adds per example of the floor with one and two outputs, and of ``F v``.

    Floor: forward, and per output a backward to the weights and to every
    layer input but the first; the suite's ``mlp_mv`` and ``cnn_mv`` floors
    have two outputs. ``F v``: the same forward and one backward, and
    ``J v``: per layer ``x W_t^T`` (the weight tangent) and, past the first
    layer, ``x_t W^T`` -- as many as a second backward.
    """
    if kind == "mlp":
        shapes = [(784, 256, 1), (256, 256, 1), (256, 10, 1)]  # in, out, positions
    else:  # the suite's CNN: 3x3 convolutions on 32 x 32, then Linear(512, 10)
        shapes = [(3 * 9, 16, 1024), (16 * 9, 32, 1024), (512, 10, 1)]
    macs = [i * o * t for i, o, t in shapes]
    forward = sum(macs)
    backward = sum(macs) + sum(macs[1:])  # weights, and inputs past the first
    jv = sum(macs) + sum(macs[1:])
    return forward + backward, forward + 2 * backward, forward + jv + backward


def _round_robin(
    cases: dict[str, Callable[[], object]], rounds: int
) -> dict[str, list[float]]:
    """Seconds of each case per round, the cases taking turns; round 0 warms up."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds + 1):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return times


def _table(title: str, times: dict[str, list[float]], base: str) -> None:
    """Medians in ms, and each over the median of ``base`` (and of NNGeometry)."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    peer = medians.get("nngeometry")
    print(f"| {title} | median ms | x {base} |" + (" x NNGeometry |" if peer else ""))
    print("|---|---|---|" + ("---|" if peer else ""))
    for name, med in medians.items():
        line = f"| {name} | {med * 1e3:.1f} | {med / medians[base]:.2f} |"
        print(line + (f" {med / peer:.2f} |" if peer else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prime_heap()  # the heap state nnfim's first call would leave, for every case

    w = make_workload("mlp")
    # the same data as one batch of 2,048: the arithmetic of joined batches
    whole = tuple(torch.cat(parts) for parts in zip(*w.batches, strict=True))
    joined = Workload(w.kind, w.model, [whole], w.n_classes)
    cases = {
        "floor": floor_thunk(w, 1),  # the suite's mlp_mc_diag floor
        "hand-written": hand_mc_diag(w),
        "hand-written, one batch": hand_mc_diag(joined),
        "nnfim": lambda: nnfim.FIM(
            w.model, w.batches, nnfim.PMatDiag, fisher_type="mc"
        ),
    }
    times = _round_robin(cases, args.rounds)
    _table("MLP Monte-Carlo diagonal", times, "floor")
    print()
    v = probe(w.model)
    lc = nnfim.LayerCollection.from_model(w.model)
    ekfac = {
        "hand-written": hand_ekfac(w, v),
        "nnfim": lambda: nnfim.FIM(
            w.model, w.batches, nnfim.PMatEKFAC, ekfac_refit=True
        ).mv(nnfim.PVector(lc, v)),
    }
    try:  # only in the benchmark environment
        from benchmarks.peers import nngeometry_kfac

        ekfac["nngeometry"] = nngeometry_kfac(w, ekfac=True)[0]
    except ImportError:
        pass
    _table("MLP EKFAC refit + mv", _round_robin(ekfac, args.rounds), "hand-written")
    print()
    mv = {
        "floor": floor_thunk(w, 2),  # the suite's mlp_mv floor
        "hand-written": hand_mv(w, v),
        "nnfim": lambda: nnfim.FIM(w.model, w.batches, nnfim.PMatImplicit).mv(
            nnfim.PVector(lc, v)
        ),
    }
    _table("MLP Fisher-vector product", _round_robin(mv, args.rounds), "floor")
    print()
    print(
        "| Fisher-vector product | floor, 1 output | floor, 2 outputs (suite) "
        "| F v | F v / floor (2 outputs) |"
    )
    print("|---|---|---|---|---|")
    for kind in ("mlp", "cnn"):
        one, two, fv = mv_multiply_adds(kind)
        print(f"| {kind} | {one:,} | {two:,} | {fv:,} | {fv / two:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
