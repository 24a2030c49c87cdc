"""Builders: a matrix of the chosen representation from a model and data."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nnfim.distributed.generator import make_generator
from nnfim.fmat import FMatDense
from nnfim.generator._passes import EKFAC_IO_ELEMENTS, LayerIO
from nnfim.generator.jacobian import Generator, OutputFn
from nnfim.layers import LayerCollection
from nnfim.pmat import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)

__all__ = ["FIM", "FIM_MonteCarlo", "NTK", "register_builder"]

Builder = Callable[[Generator, dict[str, Any]], Any]


def _kfac(g: Generator, opts: dict[str, Any]) -> PMatKFAC:
    terms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    factors, blocks = g.kfac(opts["kfac_convention"], terms=terms)
    return PMatKFAC(g.layer_collection, factors, blocks, terms)


def _ekfac(g: Generator, opts: dict[str, Any]) -> PMatEKFAC:
    """EKFAC; with ``ekfac_refit`` the refit reuses the K-FAC pass when it fits."""
    if not opts["ekfac_refit"]:
        # no sums of Kronecker terms: EKFAC needs one eigenbasis per layer
        kfac = PMatKFAC(g.layer_collection, *g.kfac(opts["kfac_convention"]))
        return PMatEKFAC.from_kfac(kfac, generator=g)
    io = LayerIO(EKFAC_IO_ELEMENTS)
    kfac = PMatKFAC(g.layer_collection, *g.kfac(opts["kfac_convention"], io))
    ekfac = PMatEKFAC.from_kfac(kfac, generator=g)
    ekfac.diags = g.ekfac_diag(ekfac.bases, io)
    return ekfac


def _gram_dual(g: Generator) -> FMatDense:
    """Gram dual of the Fisher: ``(1/n) [g_ki . g_lj]``, same nonzero spectrum."""
    data = g.gram()
    return FMatDense(data / data.shape[1])


_BUILDERS: dict[type, Builder] = {
    PMatDense: lambda g, _: PMatDense(g.layer_collection, g.dense()),
    PMatDiag: lambda g, _: PMatDiag(g.layer_collection, g.diag()),
    PMatBlockDiag: lambda g, _: PMatBlockDiag(g.layer_collection, g.block_diag()),
    PMatKFAC: _kfac,
    PMatLowRank: lambda g, _: PMatLowRank(g.layer_collection, g.factor()),
    PMatQuasiDiag: lambda g, _: PMatQuasiDiag(g.layer_collection, *g.quasi_diag()),
    PMatEKFAC: _ekfac,
    FMatDense: lambda g, _: _gram_dual(g),
    PMatImplicit: lambda g, _: PMatImplicit(
        g.layer_collection,
        g.mv,
        dtype=g.dtype,
        device=g.device,
        diag=g.diag,
        dense=g.dense,
    ),
}


def register_builder(representation: type, build: Builder) -> None:
    """Teach :func:`FIM` to fill ``representation`` from a :class:`Generator`.

    ``build(generator, options)`` receives the builder's keyword options
    (``kfac_convention``, ``ekfac_refit``).
    """
    _BUILDERS[representation] = build


def FIM(
    model: nn.Module,
    loader: Iterable[Any],
    representation: type = PMatDense,
    n_output: int | None = None,
    variant: str = "classif_logits",
    device: torch.device | str | None = None,
    function: OutputFn | None = None,
    layer_collection: LayerCollection | None = None,
    *,
    fisher_type: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    kfac_convention: str = "expand",
    ekfac_refit: bool = False,
    chunk_size: int | None = None,
    sub_batch: int | str | None = "auto",
    strict: bool = False,
    distributed: bool | dist.ProcessGroup = False,
    progress: bool = False,
) -> Any:
    r"""Fisher information matrix of ``model`` over ``loader``.

    .. math::

        F = \frac{1}{n} \sum_{i=1}^{n} J_i^\top H_i J_i

    with ``J_i`` the Jacobian of the outputs for example ``i`` and ``H_i`` the
    Fisher of the output distribution given by ``variant`` (for
    ``"classif_logits"``, ``diag(p) - p p^T``: the Fisher equals the
    Gauss-Newton matrix). With ``fisher_type="mc"``, ``H_i`` is replaced by
    the mean of ``g g^T`` over ``mc_samples`` labels sampled from the model;
    with ``"empirical"``, by ``g g^T`` at the true label.

    Args:
        model: the network; it is left exactly as it was.
        loader: batches ``inputs`` or ``(inputs, labels, ...)``; same order on
            every pass (for ``PMatImplicit``, which reads it at every product).
        representation: the matrix class, e.g. ``PMatDiag`` or ``PMatDense``.
        n_output: number of outputs ``C``, checked against the model (inferred
            when None).
        variant: ``"classif_logits"``, ``"classif_logsoftmax"``,
            ``"classif_binary"``, ``"regression"`` or ``"function"``.
        device: where batches go (default: the model's device).
        function: ``(model, batch) -> outputs (n, C)``, replacing ``model(batch[0])``.
        layer_collection: the parameters covered (default: all trainable ones).
        fisher_type: ``"exact"``, ``"mc"`` or ``"empirical"``.
        mc_samples: labels sampled per example when ``fisher_type="mc"``.
        seed: Monte-Carlo seed; the result does not depend on the global RNG.
        kfac_convention: for ``PMatKFAC`` / ``PMatEKFAC`` on layers whose
            weights are shared across positions (sequences, convolutions):
            ``"expand"`` (positions count as examples) or ``"reduce"``
            (Eschenhagen et al., 2023).
        ekfac_refit: for ``PMatEKFAC``, refit the diagonal as
            :meth:`PMatEKFAC.update_diag` does, reusing the K-FAC pass's layer
            inputs and output gradients when they fit in
            ``EKFAC_IO_ELEMENTS`` elements (else with a second pass). Default:
            the diagonal starts as the K-FAC eigenvalues (NNGeometry's).
        chunk_size: examples per chunk when per-example gradients are formed
            (dense, block-diagonal, low-rank, convolution diagonals).
        sub_batch: examples per forward and backward of the ``K`` output
            directions, and of :class:`PMatImplicit`'s products (``"auto"``:
            whole batches unless ``K`` copies of the layer outputs pass 2^24
            elements, then sub-batches of at least ``2 n / K`` examples, and
            few enough examples that the ``K`` per-example gradients of
            fallback layers stay under 2^22 elements; on CPU also few enough
            that what a sub-batch's forward saves for the backward stays
            under 16 MiB; a split batch is cut into equal sub-batches; on
            CPU, consecutive batches of the same shapes are joined while the
            same count stays under 16 MiB: faster, for more memory; ``None``:
            the loader's batches as they come). The matrix does not depend on
            it.
        strict: raise for a layer without a usable rule instead of computing
            its per-example gradients through ``torch.func`` (no rule for its
            type, a reused module, tied weights, weights used functionally).
        distributed: ``True`` (default process group) or a
            ``torch.distributed.ProcessGroup``: ``loader`` is this rank's shard
            and every rank gets the matrix of all shards together (see
            docs/distributed.md); ``False``: this process's data only.
        progress: show a progress bar (tqdm, on stderr) on each pass over
            ``loader``; silently none when tqdm is not installed.

    Returns:
        A matrix of class ``representation``. With ``FMatDense``, the Gram
        dual ``(1/n) [g_ki . g_lj]`` of shape ``(K, n, K, n)`` over the rows
        ``g_ki = J_i^T d_ki``: its nonzero eigenvalues are the Fisher's.

    Raises:
        ValueError: an unknown representation, variant or fisher type, an
            unsupported layer, a bad batch or bad outputs (the message says which).

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> loader = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> F = FIM(model, loader, representation=PMatDiag)
    >>> F.diag().shape
    torch.Size([67])
    """
    build = _BUILDERS.get(representation)
    if build is None:
        known = ", ".join(sorted(t.__name__ for t in _BUILDERS))
        raise ValueError(
            f"FIM: unknown representation {representation!r}; choose one of {known}."
        )
    gen = make_generator(
        model,
        loader,
        distributed,
        layer_collection=layer_collection,
        variant=variant,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        seed=seed,
        n_output=n_output,
        function=function,
        device=device,
        chunk_size=chunk_size,
        sub_batch=sub_batch,
        strict=strict,
        progress=progress,
    )
    return build(gen, {"kfac_convention": kfac_convention, "ekfac_refit": ekfac_refit})


def FIM_MonteCarlo(
    model: nn.Module,
    loader: Iterable[Any],
    representation: type = PMatDense,
    variant: str = "classif_logits",
    trials: int = 1,
    device: torch.device | str | None = None,
    function: OutputFn | None = None,
    layer_collection: LayerCollection | None = None,
    *,
    seed: int = 0,
    kfac_convention: str = "expand",
    ekfac_refit: bool = False,
    chunk_size: int | None = None,
    sub_batch: int | str | None = "auto",
    strict: bool = False,
    distributed: bool | dist.ProcessGroup = False,
    progress: bool = False,
) -> Any:
    """Monte-Carlo Fisher: ``FIM(..., fisher_type="mc", mc_samples=trials)``.

    NNGeometry's name and argument order; ``seed`` makes it reproducible.
    """
    return FIM(
        model,
        loader,
        representation,
        variant=variant,
        device=device,
        function=function,
        layer_collection=layer_collection,
        fisher_type="mc",
        mc_samples=trials,
        seed=seed,
        kfac_convention=kfac_convention,
        ekfac_refit=ekfac_refit,
        chunk_size=chunk_size,
        sub_batch=sub_batch,
        strict=strict,
        distributed=distributed,
        progress=progress,
    )


def NTK(
    model: nn.Module,
    loader: Iterable[Any],
    loader2: Iterable[Any] | None = None,
    *,
    n_output: int | None = None,
    function: OutputFn | None = None,
    layer_collection: LayerCollection | None = None,
    device: torch.device | str | None = None,
    distributed: bool | dist.ProcessGroup = False,
    progress: bool = False,
) -> FMatDense:
    r"""Finite-width neural tangent kernel Gram matrix.

    .. math::

        K[c, i, d, j] = \frac{\partial f_c(x_i)}{\partial \theta} \cdot
        \frac{\partial f_d(x'_j)}{\partial \theta}

    with ``x`` from ``loader`` and ``x'`` from ``loader2`` (default: the same).
    Computed layer by layer from inputs and output gradients (for a Linear
    layer ``(g . g') (x . x' + 1)``), never forming the Jacobian.

    Args:
        model: the network (left untouched).
        loader: batches ``inputs`` or ``(inputs, ...)``.
        loader2: a second set for a cross Gram ``K(X, X')``.
        n_output: expected ``C`` (checked).
        function: ``(model, batch) -> outputs (n, C)``.
        layer_collection: the parameters (default: all trainable ones).
        device: where batches go (default: the model's device).
        distributed: ``True`` or a process group: the loaders are this rank's
            shards and every rank gets the Gram of all shards, examples in
            rank order (see docs/distributed.md).
        progress: show a progress bar (tqdm, on stderr) on each pass over
            the loaders; silently none when tqdm is not installed.

    Returns:
        An :class:`FMatDense` of shape ``(C, n, C, n2)``.

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    >>> NTK(model, [torch.randn(4, 3)]).shape
    (2, 4, 2, 4)
    """

    def make(data: Iterable[Any]) -> Generator:
        return make_generator(
            model,
            data,
            distributed,
            layer_collection=layer_collection,
            variant="function" if function is not None else "regression",
            function=function,
            n_output=n_output,
            device=device,
            progress=progress,
        )

    gen = make(loader)
    return FMatDense(gen.gram(None if loader2 is None else make(loader2)))
