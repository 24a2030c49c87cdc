"""Rule for ``nn.ConvTranspose1d/2d/3d`` (stride, padding, dilation, groups)."""

from __future__ import annotations

import torch
from torch import nn

from nnfim.generator.rules._registry import LayerRule, register_rule
from nnfim.generator.rules.conv import per_example_conv_weight


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(LayerRule):
    """A transposed convolution is the adjoint of the convolution with the same weight.

    So its weight gradient is that convolution's weight gradient with the
    roles of input and output gradient exchanged. K-FAC holds these layers as
    exact blocks.
    """

    def check(self, module: nn.Module) -> None:
        """Only zero padding exists for transposed convolutions; nothing to check."""

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of shape ``(K, n, *param.shape)``."""
        assert isinstance(module, nn.modules.conv._ConvTransposeNd)
        k, n = gy.shape[:2]
        dim = x.dim() - 2
        target = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
        grads = gy.reshape(k * n, *gy.shape[2:])
        pad: tuple[int, ...] = module.padding  # type: ignore[assignment]
        if any(pad):  # cropping the output = padding the adjoint convolution's input
            spec = [q for p in reversed(pad) for q in (p, p)]
            grads = torch.nn.functional.pad(grads, spec)
        weight = per_example_conv_weight(
            dim,
            grads,
            target,
            tuple(module.weight.shape),
            module.stride,
            module.dilation,
            module.groups,
        )
        out = {"weight": weight.reshape(k, n, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = gy.reshape(k, n, gy.shape[2], -1).sum(-1)
        return out
