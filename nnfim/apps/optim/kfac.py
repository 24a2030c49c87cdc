"""K-FAC: running Kronecker factors, their eigenbasis, and the damped step in it."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nnfim.apps.optim._base import _CurvatureOptimizer, _defaults
from nnfim.distributed.collectives import distributed_eigh
from nnfim.generator import Generator
from nnfim.generator._passes import LayerIO
from nnfim.layers import LayerCollection
from nnfim.pmat._kron import from_matrix, to_matrix
from nnfim.vector import PVector

__all__ = ["KFAC"]


class _KroneckerOptimizer(_CurvatureOptimizer):
    """Running K-FAC factors, their eigendecomposition, and the eigenbasis step."""

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        self.kfac_convention = "expand"
        #: running averages: layer -> (A, G) and layer -> exact block
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.blocks: dict[str, torch.Tensor] = {}
        #: eigendecomposition at the last refresh: layer -> (L_A, Q_A, L_G, Q_G)
        #: for Kronecker layers, (L, Q) for blocks
        self.eigen: dict[str, tuple[torch.Tensor, ...]] = {}

    def _update_factors(self, gen: Generator, io: LayerIO | None = None) -> None:
        factors, blocks = gen.kfac(self.kfac_convention, io)
        decay = self.group["decay"]
        first = not self.factors and not self.blocks
        if first:
            self.factors, self.blocks = factors, blocks
            return
        self.factors = {
            n: (
                decay * a + (1 - decay) * factors[n][0],
                decay * g + (1 - decay) * factors[n][1],
            )
            for n, (a, g) in self.factors.items()
        }
        self.blocks = {
            n: decay * b + (1 - decay) * blocks[n] for n, b in self.blocks.items()
        }

    def _update_eigen(self) -> None:
        mats = {f"{n}/A": a for n, (a, _) in self.factors.items()}
        mats.update({f"{n}/G": g for n, (_, g) in self.factors.items()})
        mats.update({f"{n}/block": b for n, b in self.blocks.items()})
        if self.distributed is False:
            pairs = {k: tuple(torch.linalg.eigh(m)) for k, m in mats.items()}
        else:  # one owner per matrix by cost (KAISA), then broadcast
            pairs = dict(distributed_eigh(mats, group=self.process_group))
        eigen: dict[str, tuple[torch.Tensor, ...]] = {}
        for name in self.factors:
            eigen[name] = (*pairs[f"{name}/A"], *pairs[f"{name}/G"])
        for name in self.blocks:
            eigen[name] = tuple(pairs[f"{name}/block"])
        self.eigen = eigen

    def _has_curvature(self) -> bool:
        return bool(self.eigen)

    def _kron_diag(self, name: str, damping: float) -> torch.Tensor:
        """Damped eigenvalues ``(groups, b, a)`` of a Kronecker layer."""
        raise NotImplementedError

    def _apply(self, v: PVector, damping: float, inverse: bool) -> PVector:
        lc, out = self.layer_collection, []
        flat = v.flatten()
        for layer in lc:
            x = flat[lc.layer_slice(layer.name)]
            e = self.eigen[layer.name]
            if layer.name in self.factors:
                _, qa, _, qg = e
                d = self._kron_diag(layer.name, damping)
                m = qg.mT @ to_matrix(layer, x, qa.shape[0]) @ qa
                m = m / d if inverse else m * d
                out.append(from_matrix(layer, qg @ m @ qa.mT))
            else:
                values, q = e
                d = values + damping
                y = q.mT @ x
                out.append(q @ (y / d if inverse else y * d))
        return v.unflatten(torch.cat(out))

    def _precondition(self, g: PVector, damping: float) -> PVector:
        return self._apply(g, damping, inverse=True)

    def _damped_mv(self, v: PVector, damping: float) -> PVector:
        return self._apply(v, damping, inverse=False)

    def _curvature_state(self) -> dict[str, Any]:
        return {
            "factors": {n: list(f) for n, f in self.factors.items()},
            "blocks": dict(self.blocks),
            "eigen": {n: list(e) for n, e in self.eigen.items()},
        }

    def _load_curvature_state(self, state: dict[str, Any]) -> None:
        self.factors = {n: (f[0], f[1]) for n, f in state["factors"].items()}
        self.blocks = dict(state["blocks"])
        self.eigen = {n: tuple(e) for n, e in state["eigen"].items()}


_KRONECKER_DOC = """
    Args:
        model: the network (its trainable parameters are optimised).
        lr: step size.
        damping: ``lambda``.
        momentum: heavy-ball coefficient on the preconditioned direction.
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        kl_clip: bound on ``lr^2 v . g`` (None: no clipping).
        decay: running-average coefficient of the factors ``A <- decay A + (1 - decay) A_batch``
            (the first batch initialises them).
        update_every: steps between factor updates (on steps given a batch).
        eigen_every: steps between eigendecompositions of the running factors.
        adaptive_damping: adapt ``damping`` by the Levenberg-Marquardt rule
            (needs ``step(closure)``), with the curvature the step inverts.
        damping_factor: the rule's factor ``omega`` in ``(0, 1)``.
        min_damping: floor of the adapted damping.
        variant: as for :func:`nnfim.FIM`.
        fisher_type: output gradients: ``"mc"`` (default: one backward per
            sample, the cost of a training step), ``"exact"`` (one backward per
            output) or ``"empirical"``.
        mc_samples: Monte-Carlo samples per example.
        seed: Monte-Carlo seed (step ``k`` uses ``seed + k``).
        function: ``(model, batch) -> outputs`` for ``variant="function"``.
        layer_collection: parameters to optimise (default: all trainable ones).
        kfac_convention: ``"expand"`` or ``"reduce"`` (see :func:`nnfim.FIM`).
        distributed: ``True`` (default process group) or a
            ``torch.distributed.ProcessGroup``: ``step(batch=...)`` takes this
            rank's part of the batch, the factors (and EKFAC's scalings) are those
            of the union of the ranks' parts, the eigendecompositions are spread
            over the ranks by cost and broadcast, and the step is the same on every
            rank (``model`` may be the ``DistributedDataParallel`` wrapper; see
            docs/distributed.md). ``False``: this process's batch only.
        **generator_options: other keyword arguments of :class:`nnfim.Generator`.

    Layers without Kronecker factors (normalisation layers, layers that fall back
    to ``torch.func``) are preconditioned with their exact running block
    ``(B + lambda I)^{-1}``.
"""


class KFAC(_KroneckerOptimizer):
    """K-FAC (Martens and Grosse, 2015) with running factors.

    The step inverts per layer ``G kron A + lambda I`` exactly in the factors'
    eigenbasis, ``v = Q_G [(Q_G^T V Q_A) / (L_G L_A^T + lambda)] Q_A^T``, or with
    ``damping_method="factored"`` the factored Tikhonov heuristic
    ``(G + pi sqrt(lambda) I) kron (A + sqrt(lambda) / pi I)``,
    ``pi = sqrt((tr A / dim A) / (tr G / dim G))``; the eigendecomposition is that
    of the running factors at the last refresh (every ``eigen_every`` steps), the
    damping is the current one.
    """

    __doc__ = (__doc__ or "") + _KRONECKER_DOC

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
        damping_method: str = "exact",
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
        if damping_method not in ("exact", "factored"):
            raise ValueError(
                f"KFAC: damping_method must be 'exact' or 'factored', got {damping_method!r}."
            )
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
            damping_method=damping_method,
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

    def _refresh(self, batch: Any, force: bool) -> None:
        group, k = self.group, self.n_steps
        if force or not self.eigen or k % group["update_every"] == 0:
            self._update_factors(self._generator(batch))
        if force or not self.eigen or k % group["eigen_every"] == 0:
            self._update_eigen()

    def _kron_diag(self, name: str, damping: float) -> torch.Tensor:
        la, _, lg, _ = self.eigen[name]
        if self.group["damping_method"] == "factored" and damping > 0:
            ta, tg = la.mean(), lg.mean()
            ok = (ta > 0) & (tg > 0)
            pi = torch.where(ok, (ta / torch.where(ok, tg, 1.0)).sqrt(), 1.0)
            root = math.sqrt(damping)
            return (lg + pi * root)[:, :, None] * (la + root / pi)[:, None, :]
        return lg[:, :, None] * la[:, None, :] + damping
