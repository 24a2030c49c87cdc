"""Randomised trace, diagonal and norm estimators, and condition numbers."""

from __future__ import annotations

from typing import Any

import torch

from nnfim.linalg._operator import FlatOperator, as_operator
from nnfim.linalg.lanczos import lanczos, rademacher

__all__ = [
    "condition_number",
    "frobenius_norm_estimate",
    "hutchinson_diag",
    "hutchinson_trace",
    "hutchpp_diag",
    "hutchpp_trace",
    "nonzero_condition_number",
]


def _probes(op: FlatOperator, n: int, seed: int) -> torch.Tensor:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of probes must be a positive int, got {n!r}.")
    gen = torch.Generator().manual_seed(seed)
    return rademacher((op.size, n), gen, op.dtype, op.device)


def _apply(op: FlatOperator, vs: torch.Tensor) -> torch.Tensor:
    """``A V`` column by column, ``(size, n)``."""
    return torch.stack([op.mv(vs[:, j]) for j in range(vs.shape[1])], 1)


def hutchinson_trace(matrix: Any, n_probes: int = 16, *, seed: int = 0) -> torch.Tensor:
    """Hutchinson's unbiased trace estimate ``mean_v v^T A v`` (Rademacher ``v``).

    Args:
        matrix: the operator (see :func:`~nnfim.linalg.as_operator`).
        n_probes: products spent.
        seed: seed of the probes.

    Returns:
        The estimate, a 0-dim tensor (exact for a diagonal matrix).

    >>> float(hutchinson_trace(torch.diag(torch.tensor([1.0, 2.0, 3.0])), 4))
    6.0
    """
    op = as_operator(matrix)
    vs = _probes(op, n_probes, seed)
    return (vs * _apply(op, vs)).sum(0).mean()


def hutchinson_diag(matrix: Any, n_probes: int = 16, *, seed: int = 0) -> torch.Tensor:
    """Unbiased diagonal estimate ``mean_v v * (A v)`` (Bekas et al., 2007), ``(size,)``.

    Exact for a diagonal matrix. See :func:`hutchinson_trace` for the arguments.
    """
    op = as_operator(matrix)
    vs = _probes(op, n_probes, seed)
    return (vs * _apply(op, vs)).mean(1)


def _sketch(
    op: FlatOperator, n_matvecs: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hutch++'s range sketch ``Q``, ``A Q`` and the remaining probes ``G``."""
    if not isinstance(n_matvecs, int) or n_matvecs < 3:
        raise ValueError(
            f"Hutch++ needs n_matvecs >= 3 (a third sketches the range), got {n_matvecs!r}."
        )
    third = min(n_matvecs // 3, op.size)
    vs = _probes(op, third + (n_matvecs - 2 * third), seed)
    q, _ = torch.linalg.qr(_apply(op, vs[:, :third]))
    return q, _apply(op, q), vs[:, third:]


def _deflated(op: FlatOperator, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``(I - Q Q^T) A (I - Q Q^T) G``."""
    g = g - q @ (q.T @ g)
    ag = _apply(op, g)
    return ag - q @ (q.T @ ag)


def hutchpp_trace(matrix: Any, n_matvecs: int = 24, *, seed: int = 0) -> torch.Tensor:
    """Hutch++ trace estimate (Meyer et al., 2021): exact on a sketched range.

    A third of the products sketch the dominant range ``Q``; the trace is
    ``tr(Q^T A Q)`` plus Hutchinson on the deflated rest. Exact when the rank
    is at most ``n_matvecs // 3``; far fewer products than Hutchinson for a
    decaying spectrum such as a Fisher's.

    Args:
        matrix: the operator (see :func:`~nnfim.linalg.as_operator`).
        n_matvecs: products spent (about; at least 3).
        seed: seed of the probes.

    Returns:
        The estimate, a 0-dim tensor.
    """
    op = as_operator(matrix)
    q, aq, g = _sketch(op, n_matvecs, seed)
    rest = (g * _deflated(op, q, g)).sum(0).mean() if g.shape[1] else 0.0
    return (q * aq).sum() + rest


def hutchpp_diag(matrix: Any, n_matvecs: int = 24, *, seed: int = 0) -> torch.Tensor:
    """Diagonal by Hutch++'s deflation (Diag++, Baston and Nakatsukasa, 2022), ``(size,)``.

    ``diag(Q Q^T A)`` exactly on the sketched range plus a Hutchinson
    estimate of ``diag((I - Q Q^T) A)``; exact when the rank is at most
    ``n_matvecs // 3``. See :func:`hutchpp_trace` for the arguments.
    """
    op = as_operator(matrix)
    q, aq, g = _sketch(op, n_matvecs, seed)
    head = (q * aq).sum(1)
    if not g.shape[1]:
        return head
    ag = _apply(op, g)
    return head + (g * (ag - q @ (q.T @ ag))).mean(1)


def frobenius_norm_estimate(
    matrix: Any, n_probes: int = 16, *, seed: int = 0
) -> torch.Tensor:
    """``||A||_F`` from ``E ||A v||^2 = ||A||_F^2`` (Rademacher ``v``), a 0-dim tensor.

    Exact for a diagonal matrix. See :func:`hutchinson_trace` for the arguments.
    """
    op = as_operator(matrix)
    vs = _probes(op, n_probes, seed)
    return _apply(op, vs).square().sum(0).mean().sqrt()


def condition_number(
    matrix: Any, *, n_iter: int | None = None, seed: int = 0
) -> torch.Tensor:
    """``lambda_max / lambda_min`` from the two extreme Lanczos Ritz values.

    The Ritz values lie inside the spectrum, so with few iterations this
    underestimates the condition number; with ``n_iter`` equal to the
    dimension it is exact. A singular or indefinite matrix gives ``inf``.
    For a Fisher whose null space is known to be large, use
    :func:`nonzero_condition_number` on its eigenvalues instead.

    Args:
        matrix: a symmetric positive semi-definite operator.
        n_iter: Lanczos steps (default as in :func:`~nnfim.linalg.lanczos`).
        seed: seed of the start vector.

    Returns:
        A 0-dim tensor.
    """
    vals, _ = lanczos(matrix, 1, which="both", n_iter=n_iter, seed=seed)
    if float(vals[0]) <= 0:
        return torch.tensor(float("inf"), dtype=vals.dtype, device=vals.device)
    return vals[1] / vals[0]


def nonzero_condition_number(
    eigenvalues: torch.Tensor, rtol: float | None = None
) -> torch.Tensor:
    """Largest over smallest eigenvalue above ``rtol * lambda_max``, a 0-dim tensor.

    A mini-batch Fisher of ``n`` examples and ``C`` classes has rank at most
    ``n (C - 1)``: its ordinary condition number is infinite. This ratio over
    the eigenvalues that are not zero at working precision is the one that
    tracks training.

    Args:
        eigenvalues: any shape; NaN entries (padding) are ignored.
        rtol: the zero threshold relative to the largest eigenvalue (default
            ``1e-5`` in float32 and lower, ``1e-10`` in float64).

    Returns:
        The ratio (``nan`` when every eigenvalue is zero).

    >>> float(nonzero_condition_number(torch.tensor([0.0, 1e-9, 0.5, 2.0])))
    4.0
    """
    vals = eigenvalues[~torch.isnan(eigenvalues)].reshape(-1)
    if rtol is None:
        rtol = 1e-10 if vals.dtype == torch.float64 else 1e-5
    if vals.numel() == 0 or float(vals.max()) <= 0:
        return torch.tensor(float("nan"), dtype=vals.dtype, device=vals.device)
    top = vals.max()
    return top / vals[vals > rtol * top].min()
