"""Natural gradient descent with the Fisher in any representation."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from nnfim.apps.optim._base import _CurvatureOptimizer, _defaults
from nnfim.layers import LayerCollection
from nnfim.metrics import FIM
from nnfim.pmat import PMatAbstract, PMatDiag
from nnfim.pmat._base import _CLASSES
from nnfim.vector import PVector

__all__ = ["NaturalGradient"]


class NaturalGradient(_CurvatureOptimizer):
    """Natural gradient descent with the Fisher in any representation.

    Every ``update_every`` steps given a batch, the Fisher of that batch is
    rebuilt with :func:`nnfim.FIM` (``representation``, ``variant``,
    ``fisher_type``); each step solves ``(F + damping I) v = g`` with the
    representation's ``solve`` and applies the update of the module docstring.
    With ``PMatImplicit`` the products (conjugate gradients) read the model at
    its current weights over the batch of the last refresh. Layers without a
    rule are covered as the builders cover them (exact per-example gradients).

    Args:
        model: the network (its trainable parameters are optimised).
        representation: the Fisher's matrix class (``PMatDiag``, ``PMatKFAC``,
            ``PMatDense``, ...).
        lr: step size.
        damping: ``lambda`` added to the Fisher's diagonal.
        update_every: steps between Fisher refreshes.
        momentum: heavy-ball coefficient on the preconditioned direction.
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        kl_clip: bound on ``lr^2 v . g`` (None: no clipping).
        adaptive_damping: adapt ``damping`` by the Levenberg-Marquardt rule
            (needs ``step(closure)``).
        damping_factor: the rule's factor ``omega`` in ``(0, 1)``.
        min_damping: floor of the adapted damping.
        variant: as for :func:`nnfim.FIM`.
        fisher_type: ``"mc"`` (default: one backward per sample, the cost of a
            training step), ``"exact"`` (one backward per output) or ``"empirical"``.
        mc_samples: Monte-Carlo samples per example.
        seed: Monte-Carlo seed (step ``k`` uses ``seed + k``).
        function: ``(model, batch) -> outputs`` for ``variant="function"``.
        layer_collection: parameters to optimise (default: all trainable ones).
        solve_options: keyword arguments of ``solve`` (e.g. ``{"method": "factored"}``).
        distributed: ``True`` (default process group) or a
            ``torch.distributed.ProcessGroup``: ``step(batch=...)`` takes this
            rank's part of the batch and the Fisher is that of the union of the
            ranks' parts (``model`` may be the ``DistributedDataParallel``
            wrapper; see docs/distributed.md). ``False``: this process's batch only.
        **fim_options: other keyword arguments of :func:`nnfim.FIM`.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = NaturalGradient(model, representation=PMatDiag, lr=0.1, damping=1e-2)
    >>> loss = nn.functional.cross_entropy(model(x), y)
    >>> loss.backward()
    >>> _ = opt.step(batch=(x, y))
    """

    def __init__(
        self,
        model: nn.Module,
        representation: type = PMatDiag,
        *,
        lr: float = 0.1,
        damping: float = 1e-3,
        update_every: int = 1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        adaptive_damping: bool = False,
        damping_factor: float = 0.95,
        min_damping: float = 1e-8,
        variant: str = "classif_logits",
        fisher_type: str = "mc",
        mc_samples: int = 1,
        seed: int = 0,
        function: Any = None,
        layer_collection: LayerCollection | None = None,
        solve_options: dict[str, Any] | None = None,
        distributed: bool | dist.ProcessGroup = False,
        **fim_options: Any,
    ) -> None:
        defaults = _defaults(
            lr,
            damping,
            momentum,
            weight_decay,
            kl_clip,
            adaptive_damping,
            damping_factor,
            min_damping,
            update_every=update_every,
        )
        super().__init__(
            model,
            defaults,
            layer_collection=layer_collection,
            variant=variant,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            seed=seed,
            function=function,
            builder_options=fim_options,
            distributed=distributed,
        )
        self.representation = representation
        self.solve_options = dict(solve_options or {})
        self.fisher: PMatAbstract | None = None

    def _refresh(self, batch: Any, force: bool) -> None:
        if not force and self.fisher is not None:
            if self.n_steps % self.group["update_every"] != 0:
                return
        self.fisher = FIM(
            self.model,
            [batch],
            self.representation,
            layer_collection=self.layer_collection,
            seed=self.seed + self.n_steps,
            distributed=self.distributed,
            **self.curvature_options,
        )

    def _has_curvature(self) -> bool:
        return self.fisher is not None

    def _precondition(self, g: PVector, damping: float) -> PVector:
        assert self.fisher is not None
        return self.fisher.solve(g, regul=damping, **self.solve_options)

    def _damped_mv(self, v: PVector, damping: float) -> PVector:
        assert self.fisher is not None
        return self.fisher.mv(v) + damping * v

    def _curvature_state(self) -> dict[str, Any]:
        if self.fisher is None or not type(self.fisher).storable:
            return {"fisher": None}
        return {"fisher": type(self.fisher).__name__, **self.fisher._state()}

    def _load_curvature_state(self, state: dict[str, Any]) -> None:
        kind = state.pop("fisher")
        if kind is None:
            self.fisher = None
            return
        self.fisher = _CLASSES[kind]._from_state(self.layer_collection, state)
