"""The loss along directions in parameter space (eigenvectors, random)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from nnfim.analysis.hessian import LOSSES, LossFn, _check_model, _split, batch_loss
from nnfim.linalg.lanczos import lanczos
from nnfim.vector import PVector

__all__ = ["landscape_1d", "landscape_2d", "random_direction", "top_eigenvectors"]


def top_eigenvectors(
    matrix: Any, k: int = 2, *, n_iter: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, list[PVector]]:
    """The ``k`` largest eigenpairs of a PMat (Lanczos), as parameter-space vectors.

    Args:
        matrix: any PMat (e.g. ``Hessian(...)`` or ``FIM(..., PMatImplicit)``).
        k: how many.
        n_iter: Lanczos steps (see :func:`~nnfim.linalg.lanczos`).
        seed: seed of the start vector.

    Returns:
        Eigenvalues ``(k,)`` in descending order and the unit eigenvectors.
    """
    vals, vecs = lanczos(matrix, k, n_iter=n_iter, seed=seed)
    lc = matrix.layer_collection
    order = torch.arange(k - 1, -1, -1)
    return vals[order], [PVector.from_flat(lc, vecs[:, int(i)]) for i in order]


def random_direction(like: PVector, seed: int = 0) -> PVector:
    """A Gaussian random direction with the norm of ``like`` (same layout, dtype, device).

    >>> lc_model = torch.nn.Linear(3, 2)
    >>> v = PVector.from_model(lc_model).detach()
    >>> abs(random_direction(v).norm() - v.norm()) < 1e-5
    tensor(True)
    """
    gen = torch.Generator().manual_seed(seed)
    flat = like.flatten()
    r = torch.randn(flat.shape, generator=gen, dtype=torch.float64)
    r = (r / torch.linalg.vector_norm(r)).to(dtype=flat.dtype, device=flat.device)
    return like.unflatten(r * torch.linalg.vector_norm(flat))


def _losses(
    model: nn.Module,
    loader: Iterable[Any],
    directions: Sequence[PVector],
    coords: torch.Tensor,
    variant: str,
    loss_fn: LossFn | None,
    what: str,
) -> torch.Tensor:
    if loss_fn is None and variant not in LOSSES:
        raise ValueError(
            f"{what}: unknown variant {variant!r}; choose one of {LOSSES}."
        )
    _check_model(model, what)
    lc = directions[0].layer_collection
    if any(d.layer_collection != lc for d in directions):
        raise ValueError(f"{what}: the directions cover different layer collections.")
    base = {k: p.detach() for k, p in lc.check_model(model).items()}
    dirs = [d.to_dict() for d in directions]
    out = torch.zeros(len(coords), dtype=torch.float64)
    batches = list(loader)
    with torch.no_grad():
        for j, point in enumerate(coords):
            params = dict(base)
            for name in params:
                for c, d in zip(point, dirs, strict=True):
                    params[name] = params[name] + c.to(base[name].dtype) * d[name]
            total, n = 0.0, 0
            for batch in batches:
                x, y = _split(batch, what)
                first = base[next(iter(base))]
                x, y = x.to(first.device), y.to(first.device)
                outputs = functional_call(model, params, (x,), strict=False)
                loss = (
                    loss_fn(outputs, y) if loss_fn else batch_loss(variant, outputs, y)
                )
                total += float(loss)
                n += len(y)
            out[j] = total / max(n, 1)
    return out


def landscape_1d(
    model: nn.Module,
    loader: Iterable[Any],
    direction: PVector,
    alphas: torch.Tensor,
    *,
    variant: str = "classif_logits",
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """Mean loss at ``theta + alpha d`` for each ``alpha``.

    The model is evaluated functionally (``torch.func.functional_call``): its
    parameters are never written.

    Args:
        model: the network (left untouched; BatchNorm in eval mode).
        loader: batches ``(inputs, targets)``.
        direction: ``d``, over the model's layer collection.
        alphas: step sizes ``(m,)``.
        variant: the loss (see :func:`~nnfim.analysis.batch_loss`).
        loss_fn: ``(outputs, targets) -> summed loss`` instead.

    Returns:
        Losses ``(m,)`` in float64.

    >>> model = torch.nn.Linear(3, 2)
    >>> loader = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    >>> d = random_direction(PVector.from_model(model).detach())
    >>> landscape_1d(model, loader, d, torch.linspace(-1, 1, 3)).shape
    torch.Size([3])
    """
    coords = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1, 1)
    return _losses(model, loader, [direction], coords, variant, loss_fn, "landscape_1d")


def landscape_2d(
    model: nn.Module,
    loader: Iterable[Any],
    d1: PVector,
    d2: PVector,
    alphas: torch.Tensor,
    betas: torch.Tensor,
    *,
    variant: str = "classif_logits",
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """Mean loss at ``theta + alpha d1 + beta d2`` on a grid, ``(len(alphas), len(betas))``.

    See :func:`landscape_1d` for the arguments.
    """
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
    coords = torch.cartesian_prod(a, b).reshape(-1, 2)
    losses = _losses(model, loader, [d1, d2], coords, variant, loss_fn, "landscape_2d")
    return losses.reshape(len(a), len(b))
