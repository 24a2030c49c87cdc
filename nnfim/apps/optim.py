r"""Second-order optimizers: natural gradient with any representation, K-FAC, EKFAC.

All three are ``torch.optim.Optimizer`` objects over the parameters of one
model, with one parameter group whose entries (``lr``, ``damping``,
``momentum``, ``weight_decay``, ``kl_clip``, ...) are read at every step, so
a scheduler or a manual change takes effect at the next step. The curvature
is refreshed from the batch passed to ``step(batch=...)`` (or
``update_curvature(batch)``) through nnfim's builders: the model's
parameters, gradients, hooks and modes are left as they are.

One step, with ``g`` the gradient, ``w`` the weights, ``C`` the curvature
(the Fisher of the chosen representation, or the K-FAC / EKFAC matrix) and
``lambda`` the damping:

.. math::

    \tilde g = g + \mathrm{wd}\, w,\quad
    v = (C + \lambda I)^{-1} \tilde g,\quad
    \nu = \min\Big(1, \sqrt{\kappa / (\eta^2\, v \cdot \tilde g)}\Big),\quad
    b \leftarrow \mu b + \nu v,\quad
    w \leftarrow w - \eta b

(``kappa = kl_clip``, skipped when ``None``; ``mu = momentum``, ``b`` starts at 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nnfim.generator import Generator
from nnfim.layers import LayerCollection
from nnfim.metrics import FIM
from nnfim.pmat import PMatAbstract, PMatDiag
from nnfim.pmat._base import _CLASSES
from nnfim.pmat._kron import from_matrix, to_matrix
from nnfim.vector import PVector

__all__ = ["EKFAC", "KFAC", "NaturalGradient"]


class _CurvatureOptimizer(torch.optim.Optimizer):
    """Shared step: weight decay, preconditioning, KL clipping, momentum, damping."""

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        layer_collection: LayerCollection | None,
        variant: str,
        fisher_type: str,
        mc_samples: int,
        seed: int,
        function: Any,
        builder_options: dict[str, Any],
    ) -> None:
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{name}: pass the model (an nn.Module), not its parameters: the "
                "curvature is computed from the model's forward pass. Use "
                "layer_collection= to restrict the parameters."
            )
        for key in ("lr", "damping", "momentum", "weight_decay"):
            if defaults[key] < 0:
                raise ValueError(f"{name}: {key} must be >= 0, got {defaults[key]}.")
        if defaults["kl_clip"] is not None and defaults["kl_clip"] <= 0:
            raise ValueError(
                f"{name}: kl_clip must be > 0 or None, got {defaults['kl_clip']}."
            )
        for key in ("update_every", "eigen_every", "scale_every"):
            if key in defaults and (
                not isinstance(defaults[key], int) or defaults[key] < 1
            ):
                raise ValueError(
                    f"{name}: {key} must be a positive int, got {defaults[key]!r}."
                )
        if "decay" in defaults and not 0.0 <= defaults["decay"] < 1.0:
            raise ValueError(
                f"{name}: decay must be in [0, 1), got {defaults['decay']}."
            )
        lc = layer_collection or LayerCollection.from_model(model)
        self.model = model
        self.layer_collection = lc
        self.seed = seed
        self.curvature_options = {
            "variant": variant,
            "fisher_type": fisher_type,
            "mc_samples": mc_samples,
            "function": function,
            **builder_options,
        }
        self.n_steps = 0
        #: ratio of actual to predicted reduction at the last adaptive-damping step
        self.last_rho: float | None = None
        self._base_generator: Generator | None = None
        super().__init__(list(lc.check_model(model).values()), defaults)

    # -- to implement ------------------------------------------------------------
    def _refresh(self, batch: Any, force: bool) -> None:
        raise NotImplementedError

    def _has_curvature(self) -> bool:
        raise NotImplementedError

    def _precondition(self, g: PVector, damping: float) -> PVector:
        """``(C + damping I)^{-1} g`` (or the structure's damped inverse)."""
        raise NotImplementedError

    def _damped_mv(self, v: PVector, damping: float) -> PVector:
        """The damped matrix that :meth:`_precondition` inverts, applied to ``v``."""
        raise NotImplementedError

    def _curvature_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_curvature_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- public ------------------------------------------------------------------
    @property
    def group(self) -> dict[str, Any]:
        """The single parameter group (its entries are the hyperparameters)."""
        if len(self.param_groups) != 1:
            raise ValueError(
                f"{type(self).__name__} preconditions all parameters together and "
                f"takes one parameter group, found {len(self.param_groups)}."
            )
        return self.param_groups[0]

    def update_curvature(self, batch: Any) -> None:
        """Recompute the curvature from ``batch`` now, whatever the schedule.

        Args:
            batch: ``(inputs, labels)`` (or ``inputs`` for the exact and Monte-Carlo
                Fishers), as the builders read it.
        """
        self._refresh(batch, force=True)

    def _generator(self, batch: Any) -> Generator:
        """A generator over ``[batch]``; the layer rules are checked once, then reused."""
        if self._base_generator is None:
            self._base_generator = Generator(
                self.model,
                [batch],
                layer_collection=self.layer_collection,
                seed=self.seed,
                **self.curvature_options,
            )
            self._base_generator.rules()  # cached, and shared by the copies below
        gen = self._base_generator.with_loader([batch])
        gen.seed = self.seed + self.n_steps
        return gen

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        *,
        batch: Any = None,
    ) -> torch.Tensor | None:
        """One preconditioned step.

        Args:
            closure: re-evaluates the model and returns the loss (optional;
                required by ``adaptive_damping``: called again after the step).
            batch: the batch the curvature is refreshed from when the schedule
                says so (``update_every``...); without it the last curvature is
                reused. The first step needs one.

        Returns:
            The loss returned by ``closure`` (before the step), or None.

        Raises:
            ValueError: no curvature yet and no ``batch``; several parameter groups.
        """
        group = self.group
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if batch is not None:
            self._refresh(batch, force=False)
        if not self._has_curvature():
            raise ValueError(
                f"{type(self).__name__}.step: no curvature yet; pass the current batch "
                "as step(batch=(inputs, labels)) or call update_curvature(batch) first."
            )
        params = self.layer_collection.check_model(self.model)
        if all(p.grad is None for p in params.values()):
            return loss
        lc = self.layer_collection
        w = PVector(lc, {n: p.detach() for n, p in params.items()})
        g = PVector(
            lc,
            {
                n: torch.zeros_like(p) if p.grad is None else p.grad.detach()
                for n, p in params.items()
            },
        )
        lr, damping = group["lr"], group["damping"]
        g_wd = g + group["weight_decay"] * w if group["weight_decay"] else g
        v = self._precondition(g_wd, damping)
        if group["kl_clip"] is not None:
            vg = v.dot(g_wd) * lr**2
            # no host sync: nu = min(1, sqrt(kl_clip / vg)), 1 when vg <= 0
            nu = torch.where(
                vg > 0,
                (group["kl_clip"] / vg.clamp_min(torch.finfo(vg.dtype).tiny))
                .sqrt()
                .clamp(max=1.0),
                1.0,
            )
            v = v * nu
        with torch.no_grad():
            for name, p in params.items():
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None or not group["momentum"]:
                    buf = v[name].clone()
                else:
                    buf.mul_(group["momentum"]).add_(v[name])
                state["momentum_buffer"] = buf
                p.sub_(lr * buf)
        self.n_steps += 1
        if group.get("adaptive_damping") and closure is not None and loss is not None:
            delta = PVector(
                lc,
                {n: -lr * self.state[p]["momentum_buffer"] for n, p in params.items()},
            )
            self._adapt_damping(group, float(loss), g, delta, closure)
        return loss

    def _adapt_damping(
        self,
        group: dict[str, Any],
        loss: float,
        g: PVector,
        delta: PVector,
        closure: Callable[[], torch.Tensor],
    ) -> None:
        """Levenberg-Marquardt rule (Martens and Grosse, 2015, section 6.5)."""
        damping = group["damping"]
        predicted = float(
            g.dot(delta) + 0.5 * delta.dot(self._damped_mv(delta, damping))
        )
        with torch.enable_grad():
            new_loss = float(closure())
        if predicted >= 0:
            rho = -math.inf
        else:
            rho = (new_loss - loss) / predicted
        omega = group["damping_factor"]
        if rho > 0.75:
            damping *= omega
        elif rho < 0.25:
            damping /= omega
        group["damping"] = max(damping, group["min_damping"])
        self.last_rho = rho

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer state plus the curvature (running factors, bases, step)."""
        out = super().state_dict()
        out["nnfim"] = {"n_steps": self.n_steps, **self._curvature_state()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (curvature included).

        Raises:
            ValueError: the state has no ``"nnfim"`` entry (not from this class).
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("nnfim", None)
        if not isinstance(extra, dict):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: no 'nnfim' curvature entry; "
                "the state was not written by this optimizer class."
            )
        super().load_state_dict(state_dict)
        device = next(
            iter(self.layer_collection.check_model(self.model).values())
        ).device
        extra = _to_device(dict(extra), device)
        self.n_steps = int(extra.pop("n_steps"))
        self._load_curvature_state(extra)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Tensors of a nested dict/list moved to ``device`` (a state saved elsewhere)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _defaults(
    lr: float,
    damping: float,
    momentum: float,
    weight_decay: float,
    kl_clip: float | None,
    adaptive_damping: bool,
    damping_factor: float,
    min_damping: float,
    **extra: Any,
) -> dict[str, Any]:
    if not 0.0 < damping_factor < 1.0:
        raise ValueError(f"damping_factor must be in (0, 1), got {damping_factor}.")
    return {
        "lr": lr,
        "damping": damping,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "kl_clip": kl_clip,
        "adaptive_damping": adaptive_damping,
        "damping_factor": damping_factor,
        "min_damping": min_damping,
        **extra,
    }


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
        **fim_options: other keyword arguments of :func:`nnfim.FIM`.

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

    def _update_factors(self, gen: Generator) -> None:
        factors, blocks = gen.kfac(self.kfac_convention)
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
        eigen: dict[str, tuple[torch.Tensor, ...]] = {}
        for name, (a, g) in self.factors.items():
            la, qa = torch.linalg.eigh(a)
            lg, qg = torch.linalg.eigh(g)
            eigen[name] = (la, qa, lg, qg)
        for name, b in self.blocks.items():
            eigen[name] = tuple(torch.linalg.eigh(b))
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
        )
        self.kfac_convention = kfac_convention
        #: layer -> scalings ``(groups, b, a)`` in the current eigenbasis
        self.scalings: dict[str, torch.Tensor] = {}

    def _refresh(self, batch: Any, force: bool) -> None:
        group, k = self.group, self.n_steps
        gen = self._generator(batch)
        if force or not self.eigen or k % group["update_every"] == 0:
            self._update_factors(gen)
        if force or not self.eigen or k % group["eigen_every"] == 0:
            self._update_eigen()
            self.scalings = gen.ekfac_diag(self._bases())
        elif k % group["scale_every"] == 0:
            fresh = gen.ekfac_diag(self._bases())
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
