"""Rules for ``nn.Conv1d/2d/3d`` (stride, padding of any mode, dilation, groups)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from nnfim.generator.rules._registry import LayerRule, bordered, register_rule


def conv_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a Conv1d/2d/3d, shape ``(n, C_in * prod(kernel), L)``.

    Padding is applied explicitly (any ``padding_mode``, ``padding="same"``);
    the windows are strided views copied once (faster than ``F.unfold``, and
    defined for every number of spatial dimensions). The patch entries are in
    the order of the flattened weight ``(C_in, *kernel)``; the positions ``L``
    in row-major order of the output.
    """
    xp = padded_input(module, x)
    dim = x.dim() - 2
    u = xp
    for d, (k, s, dil) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        u = u.unfold(2 + d, dil * (k - 1) + 1, s)[..., ::dil]
    # (n, C, *out_sizes, *kernel) -> (n, C, *kernel, *out_sizes)
    spatial = list(range(2, 2 + dim))
    kernel = list(range(2 + dim, 2 + 2 * dim))
    n, c = x.shape[:2]
    return u.permute(0, 1, *kernel, *spatial).reshape(
        n, c * math.prod(module.kernel_size), -1
    )


@register_rule(nn.Conv2d)
class Conv2dRule(LayerRule):
    """Per-example gradients from unfolded patches, one contraction per group.

    Kronecker factors follow KFC (Grosse and Martens, 2016): patches are the
    inputs, the spatial positions share the weights. The same factors serve
    Conv1d and Conv3d (:class:`ConvNdRule`).
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
        module: nn.modules.conv._ConvNd,
        x: torch.Tensor,
        gy: torch.Tensor,
        with_ones: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches ``(n, groups, a, L)`` and output gradients ``(K, n, groups, b, L)``."""
        dim = len(module.kernel_size)
        if x.dim() != dim + 2:
            raise ValueError(
                f"{type(module).__name__} rule: expected a batched input (n, C, "
                f"{dim} spatial sizes), got {tuple(x.shape)}."
            )
        k, n = gy.shape[:2]
        groups = module.groups
        patches = conv_patches(module, x)
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
        assert isinstance(module, nn.modules.conv._ConvNd)
        patches, g = self._grouped(module, x, gy, with_ones=False)
        bias = module.bias is not None
        if convention == "reduce":
            pm = patches.mean(-1)
            gs = g.sum(-1)
            a = bordered(
                torch.einsum("ngd,nge->gde", pm, pm), pm.sum(0), x.shape[0], bias
            )
            return a, torch.einsum("kngb,kngc->gbc", gs, gs)
        # Batched products on the natural layout: no permuted copy of the
        # (large) patches or output gradients, and the bias's constant input
        # enters as a border instead of a concatenated row of ones.
        positions = patches.shape[-1]
        core = torch.matmul(patches, patches.transpose(-1, -2)).sum(0)
        a = (
            bordered(core, patches.sum((0, 3)), x.shape[0] * positions, bias)
            / positions
        )
        g = torch.matmul(g, g.transpose(-1, -2)).sum((0, 1))
        return a, g


def per_example_conv_weight(
    dim: int,
    inp: torch.Tensor,
    out_grad: torch.Tensor,
    weight_shape: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """Per-example weight gradients of a convolution by the grouped-convolution trick.

    The ``N`` examples are folded into the channels and handled as ``N * groups``
    groups of one weight-gradient convolution.

    Args:
        dim: 1, 2 or 3 spatial dimensions.
        inp: the convolution's (padded) input ``(N, C_in, *S)``.
        out_grad: gradients w.r.t. its output ``(N, C_out, *S')``.
        weight_shape: ``(C_out, C_in / groups, *kernel)``.
        stride: as the convolution's.
        dilation: as the convolution's.
        groups: as the convolution's.

    Returns:
        ``(N, *weight_shape)``.
    """
    fn = {
        1: nn_grad.conv1d_weight,
        2: nn_grad.conv2d_weight,
        3: nn_grad.conv3d_weight,
    }[dim]
    n = inp.shape[0]
    size = (n * weight_shape[0], *weight_shape[1:])
    w = fn(
        inp.reshape(1, -1, *inp.shape[2:]),
        size,
        out_grad.reshape(1, -1, *out_grad.shape[2:]),
        stride=stride,
        dilation=dilation,
        groups=n * groups,
    )
    return w.reshape(n, *weight_shape)


def padded_input(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The input with the convolution's padding applied explicitly (any mode)."""
    pad = module._reversed_padding_repeated_twice
    if not any(pad):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pad, mode=mode)


@register_rule(nn.Conv1d, nn.Conv3d)
class ConvNdRule(LayerRule):
    """Conv1d and Conv3d: per-example gradients by one grouped weight-gradient convolution.

    Kronecker factors as for Conv2d (KFC): the unfolded patches are the inputs.
    """

    kronecker = True
    kfac_factors = Conv2dRule.kfac_factors
    _grouped = staticmethod(Conv2dRule._grouped)

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of shape ``(K, n, *param.shape)``."""
        assert isinstance(module, nn.modules.conv._ConvNd)
        k, n = gy.shape[:2]
        dim = x.dim() - 2
        xp = padded_input(module, x)
        inp = xp.unsqueeze(0).expand(k, *xp.shape).reshape(k * n, *xp.shape[1:])
        weight = per_example_conv_weight(
            dim,
            inp,
            gy.reshape(k * n, *gy.shape[2:]),
            tuple(module.weight.shape),
            module.stride,
            module.dilation,
            module.groups,
        )
        out = {"weight": weight.reshape(k, n, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = gy.reshape(k, n, gy.shape[2], -1).sum(-1)
        return out
