"""Conjugate gradients on a matrix-free symmetric positive definite operator."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["cg"]


def cg(
    op: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    rtol: float | None = None,
    max_iter: int | None = None,
    name: str = "cg",
) -> torch.Tensor:
    """Solve ``A x = b`` by conjugate gradients, starting from zero.

    Args:
        op: ``x -> A x`` for ``x`` of shape ``(P,)``; ``A`` symmetric positive
            definite.
        b: right-hand side, shape ``(P,)``.
        rtol: stop when ``||A x - b|| <= rtol ||b||`` (default 1e-6 in float32 and
            lower precisions, 1e-10 in float64).
        max_iter: iteration cap (default ``10 P``: rounding slows CG past ``P``).
        name: what to call the operator in error messages.

    Returns:
        ``x``, shape ``(P,)``.

    Raises:
        torch.linalg.LinAlgError: no convergence within ``max_iter`` iterations,
            or a direction of non-positive curvature (singular or indefinite ``A``).

    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> cg(lambda x: A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
    tensor([0.0909, 0.6364], dtype=torch.float64)
    """
    if rtol is None:
        rtol = 1e-10 if b.dtype == torch.float64 else 1e-6
    if max_iter is None:
        max_iter = 10 * max(b.numel(), 1)
    x = torch.zeros_like(b)
    b_norm = torch.linalg.vector_norm(b)
    if float(b_norm) == 0.0:
        return x
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    threshold = (rtol * b_norm) ** 2
    for _ in range(max_iter):
        ap = op(p)
        curvature = torch.dot(p, ap)
        if float(curvature) <= 0.0:
            raise torch.linalg.LinAlgError(
                f"{name}.solve (CG): non-positive curvature p^T A p = "
                f"{float(curvature):.3g}; the matrix is singular or not positive "
                "definite: pass regul > 0."
            )
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = torch.dot(r, r)
        if rs_new <= threshold:
            return x
        p = r + (rs_new / rs) * p
        rs = rs_new
    raise torch.linalg.LinAlgError(
        f"{name}.solve (CG): no convergence in {max_iter} iterations (relative "
        f"residual {float(rs.sqrt() / b_norm):.3g} > rtol={rtol:g}); the matrix may "
        "be singular or ill-conditioned: pass regul > 0 or raise max_iter."
    )
