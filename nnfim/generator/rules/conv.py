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
    """Per-example gradients from unfolded patches, one contraction per group.

    Kronecker factors follow KFC (Grosse and Martens, 2016): patches are the
    inputs, the spatial positions share the weights.
    """

    kronecker = True

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of shape ``(K, n, C_out, C_in / groups, kh, kw)`` (and bias)."""
        assert isinstance(module, nn.Conv2d)
        patches, g = self._grouped(module, x, gy, with_ones=False)
        k, n = gy.shape[:2]
        weight = torch.einsum("kngol,ngil->kngoi", g, patches)
        out = {"weight": weight.reshape(k, n, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = gy.sum((3, 4))
        return out

    @staticmethod
    def _grouped(
        module: nn.Conv2d, x: torch.Tensor, gy: torch.Tensor, with_ones: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches ``(n, groups, a, L)`` and output gradients ``(K, n, groups, b, L)``."""
        if x.dim() != 4:
            raise ValueError(
                f"Conv2d rule: expected a batched input (n, C, H, W), got {tuple(x.shape)}."
            )
        k, n = gy.shape[:2]
        groups = module.groups
        patches = conv2d_patches(module, x)
        patches = patches.reshape(n, groups, -1, patches.shape[-1])
        if with_ones and module.bias is not None:
            ones = patches.new_ones(n, groups, 1, patches.shape[-1])
            patches = torch.cat([patches, ones], 2)
        g = gy.reshape(k, n, groups, module.out_channels // groups, -1)
        return patches, g

    def kfac_factors(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, convention: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group factors; positions expanded (KFC) or reduced."""
        assert isinstance(module, nn.Conv2d)
        patches, g = self._grouped(module, x, gy, with_ones=True)
        if convention == "reduce":
            pm = patches.mean(-1)
            gs = g.sum(-1)
            return (
                torch.einsum("ngd,nge->gde", pm, pm),
                torch.einsum("kngb,kngc->gbc", gs, gs),
            )
        positions = patches.shape[-1]
        return (
            torch.einsum("ngdl,ngel->gde", patches, patches) / positions,
            torch.einsum("kngbl,kngcl->gbc", g, g),
        )
