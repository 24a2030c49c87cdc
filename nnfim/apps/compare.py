"""Representation quality: each structured Fisher against the dense one."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from nnfim.linalg.lanczos import lanczos
from nnfim.metrics import FIM
from nnfim.pmat import (
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)
from nnfim.vector import PVector

__all__ = ["REPRESENTATIONS", "compare_representations"]

REPRESENTATIONS: tuple[type, ...] = (
    PMatDense,
    PMatLowRank,
    PMatBlockDiag,
    PMatEKFAC,
    PMatKFAC,
    PMatQuasiDiag,
    PMatDiag,
    PMatImplicit,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _solve_err(
    fim: PMatAbstract, rhs: PVector, regul: float, ref: torch.Tensor
) -> float:
    """Relative error of ``solve``; NaN when the representation refuses the solve."""
    try:
        return _rel(fim.solve(rhs, regul=regul).flatten(), ref)
    except torch.linalg.LinAlgError:
        return float("nan")


def compare_representations(
    model: nn.Module,
    loader: Iterable[Any],
    representations: Sequence[type] = REPRESENTATIONS,
    *,
    k: int = 10,
    regul: float = 1e-2,
    seed: int = 0,
    variant: str = "classif_logits",
) -> dict[str, dict[str, float]]:
    """Build the Fisher in each representation and measure it against ``PMatDense``.

    Metrics per representation: ``build_seconds`` (``PMatEKFAC`` with its
    ``update_diag()`` refit), ``mv_rel_err`` (``||M v - F v|| / ||F v||`` for a
    random ``v``), ``solve_rel_err`` (the same for ``solve(g, regul)`` with
    ``g`` a random vector; NaN where the representation reports its damped
    matrix singular), ``eig_overlap`` (``||U_k^T V_k||_F^2 / k`` between
    the top-``k`` eigenvectors of the two, found by Lanczos from the same start
    vector, 1 when the subspaces agree) and
    ``eig_overlap_err = 1 - eig_overlap``, ``top_eig_rel_err`` and
    ``trace_rel_err``.

    Args:
        model: the network (left untouched).
        loader: batches ``(inputs, labels)``.
        representations: classes to compare (``PMatDense`` is always built).
        k: eigenvectors in the overlap.
        regul: damping of the solves.
        seed: seed of the probe vectors.
        variant: the Fisher's variant.

    Returns:
        Representation name -> metric -> value.
    """
    reps = [PMatDense] + [r for r in representations if r is not PMatDense]
    fims: dict[str, PMatAbstract] = {}
    seconds: dict[str, float] = {}
    for rep in reps:
        start = time.perf_counter()
        fim = FIM(model, loader, rep, variant=variant)
        if isinstance(fim, PMatEKFAC):
            fim.update_diag()
        seconds[rep.__name__] = time.perf_counter() - start
        fims[rep.__name__] = fim
    dense = fims["PMatDense"]
    lc = dense.layer_collection
    gen = torch.Generator().manual_seed(seed)
    probe = PVector.from_flat(
        lc, torch.randn(lc.numel(), generator=gen).to(dense.dtype)
    )
    rhs = PVector.from_flat(lc, torch.randn(lc.numel(), generator=gen).to(dense.dtype))
    ref_mv = dense.mv(probe).flatten()
    ref_solve = dense.solve(rhs, regul=regul).flatten()
    k = min(k, lc.numel())
    n_iter = min(lc.numel(), max(4 * k, 60))
    ref_vals, ref_vecs = lanczos(dense, k, n_iter=n_iter, seed=seed)
    top_ref = ref_vecs.to(torch.float64)
    ref_trace = float(dense.trace())
    rows: dict[str, dict[str, float]] = {}
    for name, fim in fims.items():
        vals, vecs = lanczos(fim, k, n_iter=n_iter, seed=seed)
        overlap = float((top_ref.T @ vecs.to(torch.float64)).square().sum()) / k
        rows[name] = {
            "build_seconds": seconds[name],
            "mv_rel_err": _rel(fim.mv(probe).flatten(), ref_mv),
            "solve_rel_err": _solve_err(fim, rhs, regul, ref_solve),
            "eig_overlap": overlap,
            "eig_overlap_err": max(1.0 - overlap, 0.0),
            "top_eig_rel_err": abs(float(vals[-1] - ref_vals[-1]))
            / float(ref_vals[-1]),
            "trace_rel_err": abs(float(fim.trace()) - ref_trace) / ref_trace,
        }
    return rows
