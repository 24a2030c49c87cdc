"""Rule for ``nn.Conv2d`` (stride, padding of any mode, dilation, groups)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnfim.generator.rules._registry import LayerRule, register_rule


def conv2d_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a Conv2d, shape ``(n, C_in * kh * kw, L)``.

    Padding is applied explicitly (any ``padding_mode``, ``padding="same"``),
    so that ``unfold`` sees the tensor the convolution sees.
    """
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    return F.unfold(
        x, module.kernel_size, dilation=module.dilation, stride=module.stride
    )


@register_rule(nn.Conv2d)
class Conv2dRule(LayerRule):
    """Per-example gradients from unfolded patches, one contraction per group."""

    def check(self, module: nn.Module) -> None:
        """Only batched 4-D inputs are handled; nothing to check on the module."""

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of shape ``(K, n, C_out, C_in / groups, kh, kw)`` (and bias)."""
        assert isinstance(module, nn.Conv2d)
        if x.dim() != 4:
            raise ValueError(
                f"Conv2d rule: expected a batched input (n, C, H, W), got {tuple(x.shape)}."
            )
        k, n = gy.shape[:2]
        groups = module.groups
        patches = conv2d_patches(module, x)
        patches = patches.reshape(n, groups, -1, patches.shape[-1])
        g = gy.reshape(k, n, groups, module.out_channels // groups, -1)
        weight = torch.einsum("kngol,ngil->kngoi", g, patches)
        out = {"weight": weight.reshape(k, n, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = gy.sum((3, 4))
        return out
