"""Kernel regression with the finite-width NTK: the linearised network's predictions."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from nnfim.fmat import FMatDense
from nnfim.layers import LayerCollection
from nnfim.metrics import NTK
from nnfim.vector import FVector

__all__ = ["NTKRegressor", "ntk_predict"]


class NTKRegressor:
    r"""Predictions of the network linearised at its current weights.

    With ``K`` the NTK Gram matrix of the training inputs ``X`` (``C n x C n``),
    ``f_0`` the network's outputs at the weights given to :meth:`fit`, ``Y`` the
    targets and ``lambda = regul``, the linearised network trained by gradient
    flow on the mean squared loss
    ``(1/2n) sum_i ||f(x_i) - y_i||^2 + (lambda/2n) ||theta - theta_0||^2`` for a
    time ``t`` (``lr x steps``) predicts

    .. math::

        f_t(x) = f_0(x) + K(x, X)\, (K + \lambda I)^{-1}
        \left(I - e^{-(K + \lambda I) t / n}\right) (Y - f_0(X))

    and at convergence (``time=None``) the kernel ridge regression
    ``f_0(x) + K(x, X) (K + lambda I)^{-1} (Y - f_0(X))``. All ``C`` outputs are
    fitted together (the NTK's cross-output blocks included).

    :meth:`fit` keeps a frozen copy of the model (``copy.deepcopy``) and the
    training batches (``list(loader)``): later training of the model does not
    change the predictions. The model should be in eval mode (dropout makes
    the kernel random; BatchNorm in train mode is refused by :func:`nnfim.NTK`).

    Args:
        model: the network, outputs ``(n, C)`` (``(n,)`` is read as ``C = 1``).
        regul: ridge ``lambda >= 0``; ``0`` needs a nonsingular Gram matrix.
        function: ``(model, batch) -> outputs`` replacing ``model(batch[0])``.
        layer_collection: the parameters the kernel differentiates (default:
            all trainable ones).

    >>> model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> reg = NTKRegressor(model, regul=1e-6).fit([(x, y)])
    >>> torch.allclose(reg.predict([x]), y, atol=1e-3)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        regul: float = 0.0,
        *,
        function: Any = None,
        layer_collection: LayerCollection | None = None,
    ) -> None:
        if regul < 0:
            raise ValueError(f"NTKRegressor: regul must be >= 0, got {regul}.")
        self.model = model
        self.regul = regul
        self.function = function
        self.layer_collection = layer_collection
        self._frozen: nn.Module | None = None
        self._train: list[Any] = []
        self.kernel: FMatDense | None = None
        self.residual: torch.Tensor | None = None
        self._alpha: torch.Tensor | None = None
        self._eigh: tuple[torch.Tensor, torch.Tensor] | None = None

    def _outputs(self, model: nn.Module, loader: Iterable[Any]) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for batch in loader:
                if self.function is not None:
                    out = self.function(model, batch)
                else:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    out = model(x)
                outs.append(out.reshape(out.shape[0], -1))
        return torch.cat(outs)

    def fit(
        self, loader: Iterable[Any], targets: torch.Tensor | None = None
    ) -> NTKRegressor:
        """Compute the training Gram matrix and the residual ``Y - f_0(X)``.

        Args:
            loader: training batches ``(inputs, targets, ...)`` or ``inputs``.
            targets: ``(n, C)`` float targets, or ``(n,)`` integer class labels
                (one-hot encoded); default: the batches' second entries.

        Returns:
            ``self``.

        Raises:
            ValueError: no targets, or targets whose shape does not match the
                outputs ``(n, C)``.
        """
        self._frozen = copy.deepcopy(self.model)
        for p in self._frozen.parameters():
            p.grad = None
        self._train = list(loader)
        kernel = NTK(
            self._frozen,
            self._train,
            function=self.function,
            layer_collection=self.layer_collection,
        )
        f0 = self._outputs(self._frozen, self._train)
        if targets is None:
            if not all(
                isinstance(b, (tuple, list)) and len(b) > 1 for b in self._train
            ):
                raise ValueError(
                    "NTKRegressor.fit: the batches carry no targets; pass "
                    "targets=(n, C) tensor or batches (inputs, targets)."
                )
            targets = torch.cat([b[1] for b in self._train])
        y = _as_targets(targets, f0)
        self.kernel = kernel
        self.residual = y - f0
        rhs = FVector(self.residual.t().contiguous())
        self._alpha = kernel.solve(rhs, regul=self.regul).data
        self._eigh = None
        return self

    def predict(self, loader: Iterable[Any], time: float | None = None) -> torch.Tensor:
        """Predictions ``f_t(x)`` on the inputs of ``loader``.

        Args:
            loader: batches ``(inputs, ...)`` or ``inputs``.
            time: gradient-flow time ``t`` (``lr x steps`` for the mean loss);
                None: at convergence.

        Returns:
            ``(m, C)`` predictions.

        Raises:
            ValueError: :meth:`fit` was not called, or ``time < 0``.
        """
        if self._frozen is None or self.kernel is None or self.residual is None:
            raise ValueError("NTKRegressor.predict: call fit(loader) first.")
        if time is not None and time < 0:
            raise ValueError(f"NTKRegressor.predict: time must be >= 0, got {time}.")
        batches = list(loader)
        cross = NTK(
            self._frozen,
            batches,
            self._train,
            function=self.function,
            layer_collection=self.layer_collection,
        )
        f0 = self._outputs(self._frozen, batches)
        coef = self._alpha if time is None else self._coefficients(time)
        assert coef is not None
        return f0 + cross.mv(FVector(coef)).data.t()

    def _coefficients(self, time: float) -> torch.Tensor:
        """``(K + lambda)^{-1} (I - exp(-(K + lambda) t / n)) R`` as ``(C, n)``."""
        assert self.kernel is not None and self.residual is not None
        if self._eigh is None:
            self._eigh = self.kernel.eigh()
        values, vectors = self._eigh
        c, n = self.kernel.shape[:2]
        values = values.clamp_min(0) + self.regul
        scale = time / n
        # -expm1(-e s) / e, with its limit s as e -> 0
        tiny = values.abs() * scale < 1e-12
        ratio = torch.where(
            tiny, scale, -torch.expm1(-values * scale) / torch.where(tiny, 1.0, values)
        )
        r = self.residual.t().reshape(-1)
        return (vectors @ (ratio * (vectors.mT @ r))).reshape(c, n)


def _as_targets(targets: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
    """``(n, C)`` float targets from labels or values, checked against the outputs."""
    n, c = f0.shape
    if not targets.is_floating_point():
        if targets.dim() != 1:
            raise ValueError(
                f"NTKRegressor.fit: integer targets must be class labels (n,), got "
                f"{tuple(targets.shape)}."
            )
        targets = nn.functional.one_hot(targets.long(), c)
    targets = targets.to(f0.dtype).reshape(targets.shape[0], -1)
    if tuple(targets.shape) != (n, c):
        raise ValueError(
            f"NTKRegressor.fit: targets have shape {tuple(targets.shape)}, the model's "
            f"outputs on the training set have shape {(n, c)}."
        )
    return targets


def ntk_predict(
    model: nn.Module,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    targets: torch.Tensor | None = None,
    *,
    regul: float = 0.0,
    time: float | None = None,
    function: Any = None,
    layer_collection: LayerCollection | None = None,
) -> torch.Tensor:
    """One-call :class:`NTKRegressor`: fit on ``train_loader``, predict ``test_loader``.

    Returns:
        ``(m, C)`` predictions of the linearised network.

    >>> model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> ntk_predict(model, [(x, y)], [torch.randn(5, 3)], regul=1e-3).shape
    torch.Size([5, 1])
    """
    reg = NTKRegressor(
        model, regul, function=function, layer_collection=layer_collection
    )
    return reg.fit(train_loader, targets).predict(test_loader, time=time)
