"""Every eigenvalue of a mini-batch Fisher, through its Gram dual."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnfim.fmat import FMatDense
from nnfim.layers import LayerCollection
from nnfim.linalg.estimators import nonzero_condition_number

__all__ = ["FIMSpectrum", "fim_spectrum"]


@dataclass
class FIMSpectrum:
    """The spectrum of a Fisher ``F = (1/n) sum_i J_i^T H_i J_i``.

    Attributes:
        eigenvalues: every eigenvalue of the Gram dual in descending order,
            ``(K n,)`` in float64: the nonzero ones are exactly the Fisher's
            nonzero eigenvalues, the rest are zeros (up to rounding), as are
            the Fisher's ``P - rank`` others.
        rank: how many eigenvalues lie above ``rtol * lambda_max``.
        condition_number: ``lambda_max`` over the smallest of those.
        n_params: ``P``, the Fisher's dimension.
        rtol: the zero threshold used, relative to ``lambda_max``.
    """

    eigenvalues: torch.Tensor
    rank: int
    condition_number: float
    n_params: int
    rtol: float

    @property
    def nonzero(self) -> torch.Tensor:
        """The ``rank`` nonzero eigenvalues, descending."""
        return self.eigenvalues[: self.rank]


def fim_spectrum(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    variant: str = "classif_logits",
    fisher_type: str = "exact",
    layer_collection: LayerCollection | None = None,
    rtol: float | None = None,
    **fim_kwargs: Any,
) -> FIMSpectrum:
    r"""All eigenvalues of the Fisher of a (mini-)batch, however large ``P`` is.

    With the rows ``g_ki = J_i^T d_ki`` (``K`` per example, ``F = (1/n)
    sum g g^T``), the ``(K n, K n)`` Gram matrix ``(1/n) [g_ki . g_lj]`` has
    the same nonzero eigenvalues as the ``(P, P)`` Fisher. It is built layer
    by layer from inputs and output gradients (``FIM(...,
    representation=FMatDense)``), never forming a ``P``-sized object, and
    diagonalised in float64.

    Args:
        model: the network (left untouched).
        loader: the mini-batch(es): batches ``(inputs, labels)``.
        variant: as for :func:`~nnfim.FIM`.
        fisher_type: ``"exact"``, ``"mc"`` or ``"empirical"``.
        layer_collection: the parameters (default: every trainable one).
        rtol: eigenvalues below ``rtol * lambda_max`` count as zero (default
            ``1e-5`` for float32 models, ``1e-10`` for float64).
        **fim_kwargs: passed to :func:`~nnfim.FIM` (``mc_samples``, ``seed``, ...).

    Returns:
        A :class:`FIMSpectrum`.

    >>> model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> spec = fim_spectrum(model, [(torch.randn(4, 5), torch.randint(0, 3, (4,)))])
    >>> spec.eigenvalues.shape, spec.rank  # rank n (C - 1) = 8
    (torch.Size([12]), 8)
    """
    from nnfim.metrics import FIM

    gram = FIM(
        model,
        loader,
        FMatDense,
        variant=variant,
        fisher_type=fisher_type,
        layer_collection=layer_collection,
        **fim_kwargs,
    )
    dtype = gram.dtype
    flat = gram.dense().to(torch.float64)
    evals = torch.linalg.eigvalsh(0.5 * (flat + flat.T)).flip(0)
    if rtol is None:
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
    top = float(evals[0]) if evals.numel() else 0.0
    rank = int((evals > rtol * top).sum()) if top > 0 else 0
    lc = layer_collection or LayerCollection.from_model(model)
    return FIMSpectrum(
        evals, rank, float(nonzero_condition_number(evals, rtol)), lc.numel(), rtol
    )
