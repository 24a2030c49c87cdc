"""Lanczos eigenpairs and stochastic Lanczos quadrature on matrix-free operators."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nnfim.linalg._operator import FlatOperator, as_operator

__all__ = ["SpectralDensity", "lanczos", "rademacher", "slq"]


def rademacher(
    shape: tuple[int, ...],
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Entries ``+-1`` drawn on the CPU from ``gen``, then moved (same on any device)."""
    signs = torch.randint(0, 2, shape, generator=gen).to(dtype=dtype) * 2 - 1
    return signs.to(device)


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    t = torch.diag(alpha)
    if beta.numel():
        t = t + torch.diag(beta, 1) + torch.diag(beta, -1)
    return t


def _fresh_direction(qs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A unit vector orthogonal to the columns of ``qs`` (``(size, j)``, j < size)."""
    size = qs.shape[0]
    for _ in range(3):
        w = rademacher((size,), gen, qs.dtype, qs.device)
        for _ in range(2):
            w = w - qs @ (qs.T @ w)
        norm = torch.linalg.vector_norm(w)
        if float(norm) > 0.1:  # a +-1 vector has norm sqrt(size) >= 1
            return w / norm
    # random signs can lie in the span: take the least covered coordinate
    w = torch.zeros(size, dtype=qs.dtype, device=qs.device)
    w[int(torch.argmin(qs.square().sum(1)))] = 1
    for _ in range(2):
        w = w - qs @ (qs.T @ w)
    return w / torch.linalg.vector_norm(w)


def _lanczos_steps(
    op: FlatOperator,
    v0: torch.Tensor,
    n_iter: int,
    restart_gen: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_iter`` Lanczos steps from ``v0`` with full reorthogonalisation.

    On breakdown (an invariant Krylov subspace) the iteration restarts from a
    fresh random vector orthogonal to the basis when ``restart_gen`` is given
    (the tridiagonal matrix then has a zero off-diagonal entry), and stops
    otherwise (what quadrature needs: the subspace of ``v0`` is exhausted).

    Returns:
        ``alpha (m,)``, ``beta (m - 1,)`` and the basis ``Q (size, m)``, ``m <= n_iter``.
    """
    eps = torch.finfo(op.dtype).eps
    q = v0 / torch.linalg.vector_norm(v0)
    basis = [q]
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    scale = 0.0
    for j in range(n_iter):
        w = op.mv(q)
        a = torch.dot(q, w)
        alphas.append(a)
        qs = torch.stack(basis, 1)
        for _ in range(2):  # twice is enough (Giraud et al.)
            w = w - qs @ (qs.T @ w)
        b = torch.linalg.vector_norm(w)
        scale = max(scale, float(a.abs()) + float(b))
        if j == n_iter - 1 or len(basis) == op.size:
            break
        if float(b) <= 10 * eps * max(scale, 1e-300) * math.sqrt(op.size):
            if restart_gen is None:
                break
            w = _fresh_direction(qs, restart_gen)
            b = torch.zeros((), dtype=op.dtype, device=op.device)
            q = w
        else:
            q = w / b
        betas.append(b)
        basis.append(q)
    beta = torch.stack(betas) if betas else torch.zeros(0, dtype=op.dtype)
    return torch.stack(alphas), beta.to(op.device), torch.stack(basis, 1)


def lanczos(
    matrix: Any,
    k: int = 6,
    *,
    which: str = "largest",
    n_iter: int | None = None,
    seed: int = 0,
    size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extreme eigenpairs of a symmetric matrix by Lanczos with full reorthogonalisation.

    Only products ``A x`` are used: ``matrix`` may be any PMat (including the
    matrix-free :class:`~nnfim.PMatImplicit`, the Fisher, the GGN or the
    :func:`~nnfim.analysis.Hessian`), an :class:`~nnfim.FMatDense`, a square tensor
    or a function. With ``n_iter`` equal to the dimension the result is exact
    up to rounding; with fewer iterations the extreme Ritz pairs converge first.

    Args:
        matrix: the operator (see :func:`~nnfim.linalg.as_operator`).
        k: how many eigenpairs.
        which: ``"largest"``, ``"smallest"`` or ``"both"`` (``k`` at each end,
            ``2 k`` in all).
        n_iter: Lanczos steps, i.e. products (default ``min(size, max(4 k, 40))``).
        seed: seed of the random start vector.
        size: dimension when ``matrix`` is a function.
        dtype: dtype when ``matrix`` is a function.
        device: device when ``matrix`` is a function.

    Returns:
        Eigenvalues ``(k,)`` in ascending order and eigenvectors as columns
        ``(size, k)`` (unit norm); for ``"both"``, ``(2 k,)`` and ``(size, 2 k)``.
        For a PMat, ``PVector.from_flat(m.layer_collection, vecs[:, i])`` is a
        parameter-space vector.

    Raises:
        ValueError: a bad ``k``, ``which`` or ``n_iter``.

    >>> a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> vals, vecs = lanczos(a, k=2, n_iter=10)
    >>> vals.round(decimals=6).tolist()
    [9.0, 10.0]
    """
    op = as_operator(matrix, size=size, dtype=dtype, device=device)
    if which not in ("largest", "smallest", "both"):
        raise ValueError(
            f"lanczos: which must be 'largest', 'smallest' or 'both', got {which!r}."
        )
    need = 2 * k if which == "both" else k
    if not isinstance(k, int) or k < 1 or need > op.size:
        raise ValueError(
            f"lanczos: k={k!r} eigenpairs ({which}) asked of a matrix of size {op.size}."
        )
    if n_iter is None:
        n_iter = min(op.size, max(4 * k, 40))
    if n_iter < need or n_iter > op.size:
        raise ValueError(
            f"lanczos: n_iter={n_iter} must lie between {need} (the eigenpairs "
            f"asked) and {op.size} (the dimension)."
        )
    gen = torch.Generator().manual_seed(seed)
    v0 = rademacher((op.size,), gen, op.dtype, op.device)
    alpha, beta, basis = _lanczos_steps(op, v0, n_iter, gen)
    theta, s = torch.linalg.eigh(_tridiagonal(alpha, beta))
    m = theta.numel()
    if which == "largest":
        idx = torch.arange(m - k, m)
    elif which == "smallest":
        idx = torch.arange(0, k)
    else:
        idx = torch.cat([torch.arange(0, k), torch.arange(m - k, m)])
    idx = idx.to(theta.device)
    vecs = basis @ s[:, idx]
    return theta[idx], vecs / torch.linalg.vector_norm(vecs, dim=0)


@dataclass
class SpectralDensity:
    r"""Stochastic Lanczos quadrature of a spectrum.

    For each probe ``v`` (Rademacher, normalised), Lanczos gives nodes
    ``theta_j`` and weights ``tau_j`` with
    :math:`\sum_j \tau_j f(\theta_j) \approx v^\top f(A) v / \|v\|^2`, exact
    for polynomials of degree below ``2 m``. Averaged over probes it estimates
    ``tr f(A) / size``: the spectral density is a probability measure (each
    eigenvalue weighs ``1 / size``).

    Attributes:
        nodes: ``(n_probes, m)`` quadrature nodes (padding has weight 0).
        weights: ``(n_probes, m)`` weights, each row sums to 1.
        size: the dimension of the matrix.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    size: int

    def expectation(self, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Estimate of ``tr f(A) / size`` for an elementwise ``f``, a 0-dim tensor."""
        return (self.weights * f(self.nodes)).sum(1).mean()

    def trace(
        self, f: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Estimate of ``tr f(A)`` (``tr A`` by default), a 0-dim tensor."""
        return self.size * self.expectation(f if f is not None else (lambda t: t))

    def density(
        self, grid: torch.Tensor, sigma: float | None = None, *, log: bool = False
    ) -> torch.Tensor:
        """Gaussian-smoothed density on ``grid`` (``(g,)``), integrating to 1.

        Args:
            grid: where to evaluate, shape ``(g,)``; in ``log10`` units when ``log``.
            sigma: width of the Gaussian kernel (default: 1/100 of the node range).
            log: smooth in ``log10 |lambda|`` (for spectra spanning decades).

        Returns:
            Density values ``(g,)``.
        """
        nodes = self.nodes
        if log:
            nodes = torch.log10(nodes.abs().clamp_min(torch.finfo(nodes.dtype).tiny))
        if sigma is None:
            live = nodes[self.weights > 0]
            span = float(live.max() - live.min()) if live.numel() else 1.0
            sigma = span / 100 if span > 0 else 1.0
        diff = grid.to(nodes.dtype)[:, None, None] - nodes[None]
        kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (
            sigma * math.sqrt(2 * math.pi)
        )
        return (kernel * self.weights[None]).sum(2).mean(1)


def slq(
    matrix: Any,
    *,
    n_probes: int = 8,
    n_iter: int = 40,
    seed: int = 0,
    size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (Ubaru et al., 2017).

    Args:
        matrix: the operator (see :func:`~nnfim.linalg.as_operator`).
        n_probes: random probe vectors (each costs ``n_iter`` products).
        n_iter: Lanczos steps per probe (capped at the dimension).
        seed: seed of the probes.
        size: dimension when ``matrix`` is a function.
        dtype: dtype when ``matrix`` is a function.
        device: device when ``matrix`` is a function.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        ValueError: a bad ``n_probes`` or ``n_iter``.

    >>> a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    >>> round(float(slq(a, n_probes=2, n_iter=4).trace()), 8)
    10.0
    """
    op = as_operator(matrix, size=size, dtype=dtype, device=device)
    if n_probes < 1 or n_iter < 1:
        raise ValueError(
            f"slq: n_probes and n_iter must be positive, got {n_probes}, {n_iter}."
        )
    n_iter = min(n_iter, op.size)
    gen = torch.Generator().manual_seed(seed)
    nodes = torch.zeros(n_probes, n_iter, dtype=op.dtype, device=op.device)
    weights = torch.zeros_like(nodes)
    for i in range(n_probes):
        v = rademacher((op.size,), gen, op.dtype, op.device)
        alpha, beta, _ = _lanczos_steps(op, v, n_iter, None)
        theta, s = torch.linalg.eigh(_tridiagonal(alpha, beta))
        m = theta.numel()
        nodes[i, :m] = theta
        weights[i, :m] = s[0] ** 2
    return SpectralDensity(nodes, weights, op.size)
