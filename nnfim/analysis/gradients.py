"""Gradient statistics (gradient noise) and weight norms."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnfim.jacobian import per_example_grads
from nnfim.layers import LayerCollection
from nnfim.vector import PVector

__all__ = ["GradientStats", "gradient_statistics", "weight_norms"]


@dataclass
class GradientStats:
    """Mean and spread of the per-example gradients ``g_i`` of the loss.

    Attributes:
        mean: the full-batch gradient ``(1/n) sum g_i``.
        variance: per-coordinate variance ``(1/n) sum (g_i - mean)^2``.
        n: number of examples.
    """

    mean: PVector
    variance: PVector
    n: int

    @property
    def noise(self) -> float:
        """Trace of the gradient covariance, ``(1/n) sum ||g_i - mean||^2``."""
        return float(self.variance.flatten().sum())

    @property
    def mean_norm(self) -> float:
        """``||mean||``."""
        return float(self.mean.norm())

    @property
    def snr(self) -> float:
        """``||mean||^2 / noise``: above ~1 the batch gradient points somewhere."""
        noise = self.noise
        return self.mean_norm**2 / noise if noise > 0 else float("inf")


def gradient_statistics(
    model: nn.Module,
    loader: Iterable[Any],
    variant: str = "classif_logits",
    *,
    layer_collection: LayerCollection | None = None,
    device: torch.device | str | None = None,
) -> GradientStats:
    """Mean and variance of per-example gradients over ``loader`` (gradient noise).

    Per-example gradients come from :func:`~nnfim.per_example_grads`, one
    batch at a time (memory: one batch of ``(n_b, P)`` rows), accumulated in
    float64.

    Args:
        model: the network (left untouched).
        loader: batches ``(inputs, labels)``.
        variant: the loss, as for :func:`~nnfim.per_example_grads`.
        layer_collection: the parameters (default: every trainable one).
        device: where batches go.

    Returns:
        A :class:`GradientStats` in the model's dtype.

    >>> model = torch.nn.Linear(3, 2)
    >>> stats = gradient_statistics(model, [(torch.randn(6, 3), torch.randint(0, 2, (6,)))])
    >>> stats.n, stats.variance.flatten().shape
    (6, torch.Size([8]))
    """
    lc = layer_collection or LayerCollection.from_model(model)
    total = total_sq = None
    n = 0
    for batch in loader:
        rows = per_example_grads(
            model, [batch], variant, layer_collection=lc, device=device
        ).to(torch.float64)
        s, s2 = rows.sum(0), rows.square().sum(0)
        total = s if total is None else total + s
        total_sq = s2 if total_sq is None else total_sq + s2
        n += rows.shape[0]
    if total is None or total_sq is None or n == 0:
        raise ValueError("gradient_statistics: the loader yielded no examples.")
    dtype = next(iter(lc.check_model(model).values())).dtype
    mean = total / n
    var = (total_sq / n - mean.square()).clamp_min(0)
    return GradientStats(
        PVector.from_flat(lc, mean.to(dtype)), PVector.from_flat(lc, var.to(dtype)), n
    )


def weight_norms(
    model: nn.Module, layer_collection: LayerCollection | None = None
) -> dict[str, float]:
    """L2 and Linf norms of the weights, overall and per layer.

    Returns:
        ``{"l2": ..., "linf": ..., "l2/<layer>": ..., "linf/<layer>": ...}``.

    >>> weight_norms(torch.nn.Linear(2, 1, bias=False))["linf"] >= 0
    True
    """
    lc = layer_collection or LayerCollection.from_model(model)
    params = lc.check_model(model)
    out: dict[str, float] = {}
    with torch.no_grad():
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        out["l2"] = float(torch.linalg.vector_norm(flat))
        out["linf"] = float(flat.abs().max())
        for layer in lc:
            values = torch.cat(
                [params[layer.full_name(p)].reshape(-1) for p, _ in layer.params]
            )
            out[f"l2/{layer.name}"] = float(torch.linalg.vector_norm(values))
            out[f"linf/{layer.name}"] = float(values.abs().max())
    return out
