"""Rules for the affine parameters of normalisation layers.

Every rule computes the normalised input ``x_hat`` and contracts it with the
output gradients: ``dweight = sum(gy * x_hat)``, ``dbias = sum(gy)`` over the
positions that share a parameter.

BatchNorm in train mode normalises with the statistics of the batch, which
couples the examples. nnfim defines its per-example gradients with those
statistics held constant (the affine map of the current batch's mean and
biased variance, as in eval mode with running statistics): the layer's
forward pass is replaced by exactly that map during nnfim's passes, batches
are not split, and the running statistics are restored afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from nnfim.generator.rules._registry import LayerRule, register_rule


def _affine_grads(
    module: nn.Module,
    x_hat: torch.Tensor,
    gy: torch.Tensor,
    param_dims: int,
    channel_dim: int,
) -> dict[str, torch.Tensor]:
    """Sum ``gy * x_hat`` and ``gy`` over every axis but ``(K, n)`` and the parameter's.

    ``param_dims`` trailing-or-channel axes carry the parameter: for
    ``channel_dim = 1`` the parameter lives on the channel axis of ``x``; for
    ``channel_dim = -1`` on the last ``param_dims`` axes.
    """
    k = gy.shape[0]
    n = x_hat.shape[0]
    if channel_dim == 1:
        c = x_hat.shape[1]
        prod = (gy * x_hat).reshape(k, n, c, -1).sum(-1)
        bias = gy.reshape(k, n, c, -1).sum(-1)
    else:
        shape = x_hat.shape[x_hat.dim() - param_dims :]
        prod = (gy * x_hat).reshape(k, n, -1, *shape).sum(2)
        bias = gy.reshape(k, n, -1, *shape).sum(2)
    out = {}
    if getattr(module, "weight", None) is not None:
        out["weight"] = prod
    if getattr(module, "bias", None) is not None:
        out["bias"] = bias
    return out


def batch_stats(
    module: _BatchNorm, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel, shaped to broadcast against ``x``."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    return mean, var


def uses_batch_stats(module: _BatchNorm) -> bool:
    """Whether the module normalises with the batch's statistics."""
    return module.training or not module.track_running_stats


def frozen_batchnorm(
    module: nn.Module, args: tuple, output: torch.Tensor
) -> torch.Tensor | None:
    """Forward hook: the batch-statistics BatchNorm with the statistics held constant."""
    assert isinstance(module, _BatchNorm)
    if not uses_batch_stats(module):
        return None
    x = args[0]
    mean, var = batch_stats(module, x.detach())
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean) * torch.rsqrt(var + module.eps)
    if module.weight is not None:
        y = y * module.weight.view(shape)
    if module.bias is not None:
        y = y + module.bias.view(shape)
    return y


class _NormRule(LayerRule):
    """``prepare`` normalises the whole batch once; the rest sees ``x_hat``."""

    #: parameter axes: ``1`` for per-channel parameters, else trailing axes
    channel_dim = 1

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The normalised input ``x_hat``, same shape as ``x``."""
        raise NotImplementedError

    def prepare(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x_hat`` for the whole batch (batch statistics need every example)."""
        return self.normalise(module, x)

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients from ``x = x_hat``: ``sum(gy * x_hat)`` and ``sum(gy)``."""
        shape = getattr(module, "normalized_shape", (None,))
        dims = 1 if self.channel_dim == 1 else len(shape)
        return _affine_grads(module, x, gy, dims, self.channel_dim)


@register_rule(_BatchNorm)
class BatchNormRule(_NormRule):
    """BatchNorm1d/2d/3d: running statistics in eval mode, constant batch ones in train."""

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps)`` per channel."""
        assert isinstance(module, _BatchNorm)
        if uses_batch_stats(module):
            mean, var = batch_stats(module, x)
        else:
            assert module.running_mean is not None and module.running_var is not None
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean, var = module.running_mean.view(shape), module.running_var.view(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)


@register_rule(nn.LayerNorm)
class LayerNormRule(_NormRule):
    """LayerNorm over the last ``len(normalized_shape)`` axes, per position."""

    channel_dim = -1

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Normalised over the trailing axes."""
        assert isinstance(module, nn.LayerNorm)
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(_NormRule):
    """GroupNorm: statistics per example and group, parameters per channel."""

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Normalised per example and group."""
        assert isinstance(module, nn.GroupNorm)
        return F.group_norm(x, module.num_groups, eps=module.eps)


@register_rule(_InstanceNorm)
class InstanceNormRule(_NormRule):
    """InstanceNorm1d/2d/3d with ``affine=True``: statistics per example and channel."""

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Normalised per example and channel (running statistics in eval if tracked)."""
        assert isinstance(module, _InstanceNorm)
        if module.track_running_stats and not module.training:
            assert module.running_mean is not None and module.running_var is not None
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return (x - module.running_mean.view(shape)) * torch.rsqrt(
                module.running_var.view(shape) + module.eps
            )
        return F.instance_norm(x, eps=module.eps)
