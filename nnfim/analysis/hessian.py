"""The Hessian of the loss as a parameter-space matrix, and the GGN."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nnfim.layers import LayerCollection
from nnfim.pmat import PMatAbstract, PMatBlockDiag, PMatDense, PMatImplicit
from nnfim.vector import PVector

__all__ = ["GGN", "Hessian", "batch_loss", "hessian_vector_product"]

#: ``(outputs, targets) -> summed loss over the batch``
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES = ("classif_logits", "classif_logsoftmax", "classif_binary", "regression")


def batch_loss(
    variant: str, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Summed negative log-likelihood of a batch, the loss whose Fisher nnfim builds.

    ``classif_logits``: cross-entropy on logits; ``classif_logsoftmax``:
    ``-f_y``; ``classif_binary``: binary cross-entropy with logits;
    ``regression``: ``||y - f||^2 / 2``. Summed over the batch: divide by
    the number of examples for the mean.

    Args:
        variant: one of the four names above.
        outputs: ``(n, C)`` (or ``(n,)`` for binary and regression).
        targets: labels ``(n,)`` or targets shaped like ``outputs``.

    Returns:
        A 0-dim tensor.

    Raises:
        ValueError: an unknown variant.
    """
    if variant == "classif_logits":
        return F.cross_entropy(outputs, targets, reduction="sum")
    if variant == "classif_logsoftmax":
        return F.nll_loss(outputs, targets, reduction="sum")
    if variant == "classif_binary":
        return F.binary_cross_entropy_with_logits(
            outputs, targets.to(outputs.dtype).reshape(outputs.shape), reduction="sum"
        )
    if variant == "regression":
        diff = outputs - targets.to(outputs.dtype).reshape(outputs.shape)
        return 0.5 * diff.square().sum()
    raise ValueError(
        f"unknown loss variant {variant!r}; choose one of {LOSSES} or pass loss_fn="
    )


def _check_model(model: nn.Module, what: str) -> None:
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.training:
            raise ValueError(
                f"{what}: BatchNorm {name!r} is in train mode (a forward pass would "
                "update its running statistics and couple the examples): call "
                "model.eval() first."
            )


def _split(batch: Any, what: str) -> tuple[Any, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"{what}: each batch must be (inputs, targets, ...); got "
            f"{type(batch).__name__}."
        )
    return batch[0], batch[1]


class _Loss:
    """Loss over a loader as a function of the parameters of a layer collection."""

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        variant: str,
        loss_fn: LossFn | None,
        layer_collection: LayerCollection | None,
        device: torch.device | str | None,
        what: str,
    ) -> None:
        if loss_fn is None and variant not in LOSSES:
            raise ValueError(
                f"{what}: unknown variant {variant!r}; choose one of {LOSSES}, or "
                "pass loss_fn=(outputs, targets) -> summed loss."
            )
        _check_model(model, what)
        self.model = model
        self.loader = loader
        self.variant = variant
        self.loss_fn = loss_fn
        self.lc = layer_collection or LayerCollection.from_model(model)
        if len(self.lc) == 0:
            raise ValueError(f"{what}: the model has no trainable parameters.")
        self.params = self.lc.check_model(model)
        first = next(iter(self.params.values()))
        self.dtype = first.dtype
        self.device = torch.device(device) if device is not None else first.device
        self.what = what

    def batches(self) -> Iterator[tuple[int, torch.Tensor, tuple[torch.Tensor, ...]]]:
        """``(n, summed loss, first-order grads with graph)`` per batch."""
        params = list(self.params.values())
        for batch in self.loader:
            x, y = _split(batch, self.what)
            x, y = x.to(self.device), y.to(self.device)
            with torch.enable_grad():
                out = self.model(x)
                if self.loss_fn is not None:
                    loss = self.loss_fn(out, y)
                else:
                    loss = batch_loss(self.variant, out, y)
                grads = torch.autograd.grad(
                    loss, params, create_graph=True, allow_unused=True
                )
            grads = tuple(
                g if g is not None else torch.zeros_like(p)
                for g, p in zip(grads, params, strict=True)
            )
            yield len(y), loss, grads

    def hvp_rows(
        self, grads: tuple[torch.Tensor, ...], vs: torch.Tensor
    ) -> torch.Tensor:
        """``H_batch V^T`` for ``vs`` of shape ``(k, P)``, returns ``(k, P)``."""
        params = list(self.params.values())
        if not any(g.requires_grad for g in grads):  # a loss linear in the parameters
            return torch.zeros_like(vs)
        shapes = [p.shape for p in params]
        sizes = [p.numel() for p in params]

        def one(v: torch.Tensor) -> torch.Tensor:
            outs = torch.split(v, sizes)
            hv = torch.autograd.grad(
                grads,
                params,
                grad_outputs=[o.reshape(s) for o, s in zip(outs, shapes, strict=True)],
                retain_graph=True,
                allow_unused=True,
            )
            return torch.cat(
                [
                    (h if h is not None else torch.zeros_like(p)).reshape(-1)
                    for h, p in zip(hv, params, strict=True)
                ]
            )

        if len(vs) == 1:  # batching one product only adds vmap's overhead
            return one(vs[0])[None]
        try:
            outs = [
                o.reshape(-1, *s)
                for o, s in zip(torch.split(vs, sizes, 1), shapes, strict=True)
            ]
            hv = torch.autograd.grad(
                grads,
                params,
                grad_outputs=outs,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            return torch.cat(
                [
                    (
                        h
                        if h is not None
                        else torch.zeros(
                            len(vs), *p.shape, dtype=vs.dtype, device=vs.device
                        )
                    ).reshape(len(vs), -1)
                    for h, p in zip(hv, params, strict=True)
                ],
                1,
            )
        except RuntimeError:  # no batching rule for some operation: one at a time
            return torch.stack([one(v) for v in vs])

    def mv(self, v: PVector) -> PVector:
        total = torch.zeros(self.lc.numel(), dtype=self.dtype, device=self.device)
        count = 0
        flat = v.flatten()[None]
        for n, _, grads in self.batches():
            total = total + self.hvp_rows(grads, flat)[0].detach()
            count += n
        return PVector.from_flat(self.lc, total / max(count, 1))

    def blocks(self, names: tuple[str, ...], chunk: int) -> dict[str, torch.Tensor]:
        """Diagonal blocks ``(p_l, p_l)`` of the mean Hessian for the layers ``names``."""
        p = self.lc.numel()
        out = {
            name: torch.zeros(
                self.lc[name].numel,
                self.lc[name].numel,
                dtype=self.dtype,
                device=self.device,
            )
            for name in names
        }
        count = 0
        for n, _, grads in self.batches():
            count += n
            for name in names:
                sl = self.lc.layer_slice(name)
                width = sl.stop - sl.start
                for start in range(0, width, chunk):
                    stop = min(width, start + chunk)
                    vs = torch.zeros(
                        stop - start, p, dtype=self.dtype, device=self.device
                    )
                    idx = torch.arange(start, stop, device=self.device)
                    vs[idx - start, sl.start + idx] = 1
                    rows = self.hvp_rows(grads, vs).detach()
                    out[name][start:stop] += rows[:, sl]
        return {k: v / max(count, 1) for k, v in out.items()}

    def dense(self, chunk: int) -> torch.Tensor:
        p = self.lc.numel()
        total = torch.zeros(p, p, dtype=self.dtype, device=self.device)
        count = 0
        eye = torch.eye(p, dtype=self.dtype, device=self.device)
        for n, _, grads in self.batches():
            count += n
            for start in range(0, p, chunk):
                total[start : start + chunk] += self.hvp_rows(
                    grads, eye[start : start + chunk]
                ).detach()
        total = total / max(count, 1)
        return 0.5 * (total + total.T)  # exact up to rounding; symmetrise it


def hessian_vector_product(
    model: nn.Module,
    loader: Iterable[Any],
    v: PVector,
    *,
    variant: str = "classif_logits",
    loss_fn: LossFn | None = None,
    device: torch.device | str | None = None,
) -> PVector:
    r"""``H v`` for the mean loss over ``loader``, by double backward.

    .. math::

        H = \frac{1}{n} \sum_{i=1}^{n} \nabla^2_\theta \ell(f(x_i), y_i)

    Args:
        model: the network (left exactly as it was).
        loader: batches ``(inputs, targets, ...)``.
        v: the vector, over the model's layer collection.
        variant: the loss (see :func:`batch_loss`).
        loss_fn: ``(outputs, targets) -> summed loss`` instead of ``variant``.
        device: where batches go (default: the model's device).

    Returns:
        ``H v``.
    """
    loss = _Loss(model, loader, variant, loss_fn, v.layer_collection, device, "hvp")
    return loss.mv(v)


def Hessian(
    model: nn.Module,
    loader: Iterable[Any],
    representation: type = PMatImplicit,
    *,
    variant: str = "classif_logits",
    loss_fn: LossFn | None = None,
    layer_collection: LayerCollection | None = None,
    device: torch.device | str | None = None,
    chunk_size: int = 64,
) -> PMatAbstract:
    r"""Hessian of the loss, normalised like the Fisher (a mean over examples).

    .. math::

        H = \frac{1}{n} \sum_{i=1}^{n} \nabla^2_\theta \ell(f(x_i), y_i)

    with ``ell`` the negative log-likelihood of ``variant`` (for
    ``classif_logits`` the cross-entropy: the Fisher ``FIM(...)`` is then its
    Gauss-Newton part). Products are Hessian-vector products by double
    backward; ``PMatDense`` and ``PMatBlockDiag`` probe them with batches of
    ``chunk_size`` basis vectors (``P`` products per batch of data: small
    models), ``PMatImplicit`` stores nothing and costs one pass per product.
    ``PMatImplicit.diag()`` and ``dense()`` are exact but probe all ``P``
    basis vectors. The Hessian is symmetric but may be indefinite: ``solve`` needs ``regul``
    large enough, or use :func:`~nnfim.linalg.lanczos` for its spectrum.

    Args:
        model: the network (left exactly as it was: parameters, ``.grad``,
            modes and hooks). BatchNorm must be in eval mode.
        loader: batches ``(inputs, targets, ...)``, the same on every pass.
        representation: ``PMatImplicit`` (default), ``PMatDense`` or ``PMatBlockDiag``.
        variant: the loss: ``classif_logits``, ``classif_logsoftmax``,
            ``classif_binary`` or ``regression`` (see :func:`batch_loss`).
        loss_fn: ``(outputs, targets) -> loss summed over the batch``, instead
            of ``variant``.
        layer_collection: the parameters (default: every trainable one).
        device: where batches go (default: the model's device).
        chunk_size: basis vectors per batched double backward.

    Returns:
        A matrix of class ``representation``.

    Raises:
        ValueError: an unsupported representation or variant, a BatchNorm in
            train mode, batches without targets.

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> loader = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> H = Hessian(model, loader, representation=PMatDense)
    >>> H.dense().shape
    torch.Size([26, 26])
    """
    supported = (PMatImplicit, PMatDense, PMatBlockDiag)
    if representation not in supported:
        names = ", ".join(t.__name__ for t in supported)
        raise ValueError(
            f"Hessian: representation {getattr(representation, '__name__', representation)!r} "
            f"is not available for the Hessian; choose one of {names} (the others "
            "rely on the Fisher's per-example outer-product structure)."
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"Hessian: chunk_size must be a positive int, got {chunk_size!r}."
        )
    loss = _Loss(model, loader, variant, loss_fn, layer_collection, device, "Hessian")
    lc = loss.lc
    if representation is PMatDense:
        return PMatDense(lc, loss.dense(chunk_size))
    if representation is PMatBlockDiag:
        return PMatBlockDiag(lc, loss.blocks(lc.layer_names, chunk_size))

    def dense() -> torch.Tensor:
        return loss.dense(chunk_size)

    return PMatImplicit(
        lc,
        loss.mv,
        dtype=loss.dtype,
        device=loss.device,
        dense=dense,
        diag=lambda: torch.diagonal(dense()),
    )


def GGN(
    model: nn.Module,
    loader: Iterable[Any],
    representation: type = PMatImplicit,
    *,
    variant: str = "classif_logits",
    layer_collection: LayerCollection | None = None,
    device: torch.device | str | None = None,
) -> Any:
    r"""Generalised Gauss-Newton matrix of the loss, ``(1/n) sum_i J_i^T (d^2 l / df^2) J_i``.

    For the losses of :func:`batch_loss` (exponential-family likelihoods with
    their canonical link) the GGN is the exact Fisher, so this is
    ``FIM(model, loader, representation, variant=variant)``: every
    representation is available, ``PMatImplicit`` (the default) being the
    matrix-free operator.
    """
    from nnfim.metrics import FIM

    if variant not in LOSSES:
        raise ValueError(f"GGN: unknown variant {variant!r}; choose one of {LOSSES}.")
    return FIM(
        model,
        loader,
        representation,
        variant=variant,
        layer_collection=layer_collection,
        device=device,
    )
