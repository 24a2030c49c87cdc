"""EKFAC: K-FAC's eigenbasis with refitted scalings."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nnfim.apps.optim._base import _defaults
from nnfim.apps.optim.kfac import _KRONECKER_DOC, _KroneckerOptimizer
from nnfim.generator._passes import EKFAC_IO_ELEMENTS, LayerIO
from nnfim.layers import LayerCollection

__all__ = ["EKFAC"]


class EKFAC(_KroneckerOptimizer):
    """EKFAC (George et al., 2018): K-FAC's eigenbasis, refitted scalings.

    Every ``eigen_every`` steps the running factors' eigenbasis is recomputed
    and the scalings ``S`` are reset to the exact second moments of the
    current batch's per-example gradients in that basis,
    ``S = (1/n) sum_i sum_k (Q_G^T dW_ik Q_A)^2``; every ``scale_every`` steps
    in between they are updated by ``S <- decay S + (1 - decay) S_batch`` in the
    same basis. The step is
    ``v = Q_G [(Q_G^T V Q_A) / (S + lambda)] Q_A^T``: the gradient rotated into
    the eigenbasis, divided by the damped scalings, rotated back.
    """

    __doc__ = (__doc__ or "") + _KRONECKER_DOC.replace(
        "        adaptive_damping:",
        "        scale_every: steps between scaling updates.\n        adaptive_damping:",
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.1,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        decay: float = 0.95,
        update_every: int = 1,
        eigen_every: int = 10,
        scale_every: int = 1,
        adaptive_damping: bool = False,
        damping_factor: float = 0.95,
        min_damping: float = 1e-8,
        variant: str = "classif_logits",
        fisher_type: str = "mc",
        mc_samples: int = 1,
        seed: int = 0,
        function: Any = None,
        layer_collection: LayerCollection | None = None,
        kfac_convention: str = "expand",
        distributed: bool | dist.ProcessGroup = False,
        **generator_options: Any,
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
            decay=decay,
            update_every=update_every,
            eigen_every=eigen_every,
            scale_every=scale_every,
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
            builder_options=generator_options,
            distributed=distributed,
        )
        self.kfac_convention = kfac_convention
        #: layer -> scalings ``(groups, b, a)`` in the current eigenbasis
        self.scalings: dict[str, torch.Tensor] = {}

    def _refresh(self, batch: Any, force: bool) -> None:
        group, k = self.group, self.n_steps
        gen = self._generator(batch)
        # the scalings of this batch reuse the factors' pass when it is kept
        io = None
        if force or not self.eigen or k % group["update_every"] == 0:
            io = LayerIO(EKFAC_IO_ELEMENTS)
            self._update_factors(gen, io)
        if force or not self.eigen or k % group["eigen_every"] == 0:
            self._update_eigen()
            self.scalings = gen.ekfac_diag(self._bases(), io)
        elif k % group["scale_every"] == 0:
            fresh = gen.ekfac_diag(self._bases(), io)
            decay = group["decay"]
            self.scalings = {
                n: decay * s + (1 - decay) * fresh[n] for n, s in self.scalings.items()
            }

    def _bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (self.eigen[n][1], self.eigen[n][3]) for n in self.factors}

    def _kron_diag(self, name: str, damping: float) -> torch.Tensor:
        return self.scalings[name] + damping

    def _curvature_state(self) -> dict[str, Any]:
        return {**super()._curvature_state(), "scalings": dict(self.scalings)}

    def _load_curvature_state(self, state: dict[str, Any]) -> None:
        super()._load_curvature_state(state)
        self.scalings = dict(state["scalings"])
