"""Rule for the affine parameters of BatchNorm in eval mode."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nnfim.generator.rules._registry import LayerRule, register_rule


@register_rule(_BatchNorm)
class BatchNormEvalRule(LayerRule):
    """In eval mode BatchNorm is the per-channel affine map of its running stats."""

    def check(self, module: nn.Module) -> None:
        """Train mode (or no running stats) normalises with batch statistics.

        Raises:
            ValueError: the module would use batch statistics.
        """
        assert isinstance(module, _BatchNorm)
        if module.training or not module.track_running_stats:
            raise ValueError(
                f"{type(module).__name__} in train mode (or without running stats) "
                "couples the examples of a batch: call model.eval() before building "
                "the Fisher."
            )

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of shape ``(K, n, C)`` for weight and bias."""
        assert isinstance(module, _BatchNorm)
        assert module.running_mean is not None and module.running_var is not None
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - module.running_mean.view(shape)) * torch.rsqrt(
            module.running_var.view(shape) + module.eps
        )
        spatial = tuple(range(3, gy.dim()))
        out = {}
        if module.weight is not None:
            out["weight"] = (gy * x_hat).sum(spatial) if spatial else gy * x_hat
        if module.bias is not None:
            out["bias"] = gy.sum(spatial) if spatial else gy
        return out
