"""The shared step of the curvature optimizers: decay, preconditioning, clipping, momentum."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnfim.distributed.collectives import agree, all_reduce_mean, rank_seed, rank_world
from nnfim.distributed.generator import DistributedGenerator, make_generator
from nnfim.generator import Generator
from nnfim.layers import LayerCollection
from nnfim.vector import PVector


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
        distributed: bool | dist.ProcessGroup = False,
    ) -> None:
        name = type(self).__name__
        model = _unwrap(name, model, distributed)
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
        #: False, True (the default group) or a process group, as the builders'
        self.distributed = distributed
        self.process_group = None if distributed is True else distributed
        if distributed is not False:
            rank_world(self.process_group)  # an initialised group, or a clear error
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
        """A generator over ``[batch]``; the layer rules are checked once, then reused.

        With ``distributed`` it is a :class:`DistributedGenerator`: ``batch`` is
        this rank's part, and every result covers the union of the ranks' batches.
        """
        if self._base_generator is None:
            base = make_generator(
                self.model,
                [batch],
                self.distributed,
                layer_collection=self.layer_collection,
                seed=self.seed,
                **self.curvature_options,
            )
            error: BaseException | None = None
            try:
                base.rules()  # cached, and shared by the copies below
            except Exception as exc:
                error = exc
            if isinstance(base, DistributedGenerator):
                # a rank whose layer check failed stops the others now; the
                # parameters are checked to agree across ranks at the first step
                agree(
                    f"{type(self).__name__}'s first curvature refresh",
                    0,
                    error,
                    group=self.process_group,
                    device=base.device,
                    params=list(base.params.values()),
                )
            elif error is not None:
                raise error
            self._base_generator = base
        gen = self._base_generator.with_loader([batch])
        seed = self.seed + self.n_steps
        if isinstance(gen, DistributedGenerator):
            gen.base_seed, gen.seed = seed, rank_seed(seed, gen.rank)
        else:
            gen.seed = seed
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
        if self.distributed is not False:
            # the closure's loss is this rank's; DDP's gradient is the mean over
            # ranks of theirs, so rho compares the means (the same on every rank)
            (both,) = all_reduce_mean(
                [torch.tensor([loss, new_loss], dtype=torch.float64, device=g.device)],
                group=self.process_group,
            )
            loss, new_loss = both.tolist()
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


def _unwrap(
    name: str, model: nn.Module, distributed: bool | dist.ProcessGroup
) -> nn.Module:
    """The module the hooks go on: a ``DistributedDataParallel`` wrapper's ``.module``."""
    if not (distributed is True or distributed is False) and not isinstance(
        distributed, dist.ProcessGroup
    ):
        raise TypeError(
            f"{name}: distributed must be False, True or a "
            f"torch.distributed.ProcessGroup, got {type(distributed).__name__}."
        )
    if isinstance(model, DistributedDataParallel):
        if distributed is False:
            raise ValueError(
                f"{name}: the model is wrapped in DistributedDataParallel but "
                "distributed=False: each rank would precondition with the curvature "
                "of its own batch and the ranks' parameters would drift apart. Pass "
                "distributed=True (or the wrapper's process group)."
            )
        return model.module
    return model


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
