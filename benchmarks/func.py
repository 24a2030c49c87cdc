"""``torch.func`` implementations of every quantity: the independent peer.

Each ``prepare`` returns the timed thunk and the converter to the group's
common layout (``named_parameters`` order, mean over examples).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from benchmarks.suite import Convert, Thunk
from benchmarks.workloads import Workload, probe

#: examples per Jacobian chunk ``(chunk, C, P)``: 4 keeps the MLP's largest
#: block near 32 MB; larger chunks ran slower (fresh pages)
CHUNK = 4
#: rows of a per-example gradient matrix kept for the agreement check
PEG_ROWS = 128


def _params(w: Workload) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in w.model.named_parameters()}


def _per_example_jacobian(w: Workload) -> Any:
    """``(params, x) -> ({name: (m, C, *shape)}, logits (m, C))`` over a chunk."""

    def f(prm: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        out = functional_call(w.model, prm, (x[None],))[0]
        return out, out

    return vmap(jacrev(f, has_aux=True), in_dims=(None, 0))


def _cat(parts: dict[str, torch.Tensor], w: Workload) -> torch.Tensor:
    return torch.cat([parts[k] for k, _ in w.model.named_parameters()], -1)


def func_diag(w: Workload) -> tuple[Thunk, Convert]:
    """Exact diagonal: ``sum_c p_c J_c^2 - (sum_c p_c J_c)^2``, mean over examples."""
    params, jac = _params(w), _per_example_jacobian(w)

    def run() -> torch.Tensor:
        acc = {k: torch.zeros(p.numel()) for k, p in params.items()}
        for x, _ in w.batches:
            for xc in x.split(CHUNK):
                jacs, out = jac(params, xc)
                p = torch.softmax(out, -1)
                for k, j in jacs.items():
                    j = j.flatten(2)  # (m, C, q)
                    pj = torch.bmm(p[:, None, :], j)
                    acc[k] += (p.reshape(1, -1) @ (j * j).flatten(0, 1))[0]
                    acc[k] -= (pj * pj).sum((0, 1))
        return _cat(acc, w) / w.n_examples

    return run, lambda out: out


def func_dense(w: Workload) -> tuple[Thunk, Convert]:
    """Exact Fisher ``(1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i``, ``(P, P)``."""
    params, jac = _params(w), _per_example_jacobian(w)
    n_params = sum(p.numel() for p in params.values())

    def run() -> torch.Tensor:
        total = torch.zeros(n_params, n_params)
        for x, _ in w.batches:
            for xc in x.split(64):
                jacs, out = jac(params, xc)
                j = _cat({k: v.flatten(2) for k, v in jacs.items()}, w)  # (m, C, P)
                p = torch.softmax(out, -1)
                sqrt_p = p.sqrt()[:, :, None]
                # H = diag(p) - p p^T = (diag(sqrt p) - p sqrt(p)^T) (...)^T
                pj = torch.bmm(p[:, None, :], j)  # (m, 1, P)
                s = sqrt_p * j - sqrt_p * pj  # rows of (D - s p^T)-weighted J
                s = s.flatten(0, 1)
                total.addmm_(s.T, s)
        return total / w.n_examples

    return run, lambda out: out


def func_ntk(w: Workload) -> tuple[Thunk, Convert]:
    """``vmap(jacrev)`` per batch, then one einsum per parameter over all examples."""
    params, jac = _params(w), _per_example_jacobian(w)

    def run() -> torch.Tensor:
        parts = [jac(params, x)[0] for x, _ in w.batches]
        total = None
        for k in params:
            j = torch.cat([p[k] for p in parts]).flatten(2)
            g = torch.einsum("icp,jdp->cidj", j, j)
            total = g if total is None else total + g
        assert total is not None
        return total

    return run, lambda out: out


def func_mv(w: Workload) -> tuple[Thunk, Convert]:
    """``F v`` per batch: ``jvp`` for ``J v``, the softmax Hessian, ``vjp`` for ``J^T``."""
    params = _params(w)
    v = {k: t for k, t in probe(w.model).items()}

    def run() -> torch.Tensor:
        acc = {k: torch.zeros_like(p) for k, p in params.items()}
        for x, _ in w.batches:

            def f(prm: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                return functional_call(w.model, prm, (x,))

            out, jv = jvp(f, (params,), (v,))  # type: ignore[misc]
            p = torch.softmax(out, -1)
            hjv = p * jv - p * (p * jv).sum(-1, keepdim=True)
            _, pull = vjp(f, params)  # type: ignore[misc]
            for k, g in pull(hjv)[0].items():
                acc[k] += g
        return _cat({k: t.reshape(-1) for k, t in acc.items()}, w) / w.n_examples

    return run, lambda out: out


def _per_example_loss_grad(w: Workload) -> Any:
    def loss(prm: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
        out = functional_call(w.model, prm, (x[None],))
        return F.cross_entropy(out, y[None])

    return vmap(grad(loss), in_dims=(None, 0, 0))


def func_pegrads(w: Workload) -> tuple[Thunk, Convert]:
    """``vmap(grad)`` of each example's cross-entropy: ``(n, P)``."""
    params, g = _params(w), _per_example_loss_grad(w)

    def run() -> torch.Tensor:
        rows = []
        for x, y in w.batches:
            grads = g(params, x, y)
            rows.append(_cat({k: t.flatten(1) for k, t in grads.items()}, w))
        return torch.cat(rows)

    return run, lambda out: out[:PEG_ROWS]


def func_mc_diag(w: Workload) -> tuple[Thunk, Convert]:
    """One label per example sampled from the softmax, ``vmap(grad)``, squares, mean."""
    params, g = _params(w), _per_example_loss_grad(w)

    def run() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        acc = {k: torch.zeros(p.numel()) for k, p in params.items()}
        for x, _ in w.batches:
            with torch.no_grad():
                p = torch.softmax(functional_call(w.model, params, (x,)), -1)
            y = torch.multinomial(p, 1, generator=gen)[:, 0]
            for k, t in g(params, x, y).items():
                acc[k] += (t.flatten(1) ** 2).sum(0)
        return _cat(acc, w) / w.n_examples

    return run, lambda out: out
