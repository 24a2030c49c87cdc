"""Rule for ``nn.Conv2d`` (stride, padding of any mode, dilation, groups)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from nnfim.generator.rules import _registry
from nnfim.generator.rules._registry import (
    LayerRule,
    bordered,
    numel,
    register_rule,
    xtx,
)


def conv2d_patches(module: nn.Conv2d, xp: torch.Tensor) -> torch.Tensor:
    """Input patches of a Conv2d, shape ``(n, C_in * kh * kw, L)``.

    Args:
        module: the convolution.
        xp: its input with the padding applied (:func:`padded_input`),
            ``(n, C_in, H + pads, W + pads)``.

    The windows are strided views copied once (faster than ``F.unfold``).
    """
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    u = xp.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh]
    u = u.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]  # (n, C, Ho, Wo, kh, kw)
    n, c = xp.shape[:2]
    return u.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, -1)


def grouped_patches(module: nn.Conv2d, xp: torch.Tensor) -> torch.Tensor:
    """Patches in the layout of ``A``'s products, ``(groups, a, n, L)``.

    ``a = C_in / groups * kh * kw``; ``xp`` is the padded input ``(n, C_in, ...)``.
    """
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    u = xp.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh]
    u = u.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]  # (n, C, Ho, Wo, kh, kw)
    n, groups = xp.shape[0], module.groups
    return u.permute(1, 4, 5, 0, 2, 3).reshape(groups, -1, n, u.shape[2] * u.shape[3])


#: Patch elements unfolded at a time for ``A``: a few examples' patches stay
#: in cache for their product, and are not allocated whole (2x faster than
#: one unfold of a batch of 128 for the benchmark CNN, CPU, torch 2.13).
PATCH_CHUNK_ELEMENTS = 1 << 21

#: Per-example weight gradients of a Conv2d whose patches are at most this long
#: (``C_in / groups * kh * kw``) are products with the unfolded patches; longer
#: ones are one grouped weight-gradient convolution, which needs no patches and
#: was 1.8x faster for 144 (2x slower for 27) on CPU, torch 2.13.
PATCH_PRODUCT_MAX = 64


@register_rule(nn.Conv2d)
class Conv2dRule(LayerRule):
    """Per-example gradients direction by direction, without ``K`` input copies.

    ``prepare`` pads the input once per batch (any ``padding_mode``,
    ``padding="same"``); every other method receives the padded input.
    Kronecker factors follow KFC (Grosse and Martens, 2016): patches are the
    inputs, the spatial positions share the weights; ``A`` needs the inputs
    alone and ``G`` the output gradients alone.
    """

    kronecker = True

    def prepare(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input with the padding applied, ``(n, C_in, H + pads, W + pads)``."""
        assert isinstance(module, nn.Conv2d)
        if x.dim() != 4:
            raise ValueError(
                f"Conv2d rule: expected a batched input (n, C, H, W), got {tuple(x.shape)}."
            )
        return padded_input(module, x)

    def weight_grads(
        self, module: nn.Conv2d, xp: torch.Tensor, gy: torch.Tensor
    ) -> torch.Tensor:
        """Per-example weight gradients of one direction, ``(n, *weight.shape)``.

        Args:
            module: the convolution.
            xp: padded input ``(n, C_in, ...)``.
            gy: output gradients of one direction ``(n, C_out, Ho, Wo)``.
        """
        n, groups = xp.shape[0], module.groups
        shape = tuple(module.weight.shape)
        if math.prod(shape[1:]) > PATCH_PRODUCT_MAX:
            return per_example_conv_weight(
                2, xp, gy, shape, module.stride, module.dilation, groups
            )
        patches = conv2d_patches(module, xp).reshape(n, groups, -1, gy[0, 0].numel())
        g = gy.reshape(n, groups, module.out_channels // groups, -1)
        # (a, L) @ (L, b): 1.5x faster than (b, L) @ (L, a) for a = 27, b = 16
        w = torch.matmul(patches, g.transpose(-1, -2)).transpose(-1, -2)
        return w.reshape(n, *shape)

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of shape ``(K, n, C_out, C_in / groups, kh, kw)`` (and bias)."""
        assert isinstance(module, nn.Conv2d)
        weight = torch.stack([self.weight_grads(module, x, g) for g in gy])
        out = {"weight": weight}
        if module.bias is not None:
            out["bias"] = gy.sum((3, 4))
        return out

    def diag(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Squares summed direction by direction: ``(n, p)`` gradients at a time."""
        assert isinstance(module, nn.Conv2d)
        weight = torch.zeros_like(module.weight, dtype=gy.dtype)
        step = max(1, _registry.DEFAULT_CHUNK_ELEMENTS // max(numel(module), 1))
        for start in range(0, x.shape[0], step):
            xc = x[start : start + step]
            for g in gy[:, start : start + step]:
                w = self.weight_grads(module, xc, g)
                weight += w.square_().sum(0)
        out = {"weight": weight}
        if module.bias is not None:
            b = gy.sum((3, 4))
            out["bias"] = (b * b).sum((0, 1))
        return out

    def kfac_a(
        self, module: nn.Module, x: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """Per-group ``A`` of the patches; positions expanded (KFC) or reduced.

        The patches are unfolded a few examples at a time, straight into the
        ``(groups, a, examples * positions)`` layout of one matrix product per
        group (symmetric: its upper blocks only, see ``xtx``); the bias's
        constant input enters as a border instead of a row of ones.
        """
        assert isinstance(module, nn.Conv2d)
        n, groups = x.shape[0], module.groups
        a = math.prod(module.weight.shape[1:])
        core = x.new_zeros(groups, a, a)
        total = x.new_zeros(groups, a)
        positions = 1
        step = max(1, PATCH_CHUNK_ELEMENTS // max(a * groups * x[0, 0].numel(), 1))
        for start in range(0, n, step):
            p = grouped_patches(module, x[start : start + step])
            positions = p.shape[-1]
            p = p.mean(-1) if convention == "reduce" else p.reshape(groups, a, -1)
            total += p.sum(-1)
            if groups == 1:
                xtx(p[0].t(), block=max(48, a // 6), out=core[0])
            else:
                core.baddbmm_(p, p.transpose(1, 2))
        bias = module.bias is not None
        if convention == "reduce":
            return bordered(core, total, n, bias)
        return bordered(core, total, n * positions, bias) / positions

    def kfac_g(
        self, module: nn.Module, gy: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """Per-group ``G``; positions expanded (summed products) or reduced."""
        assert isinstance(module, nn.modules.conv._ConvNd)
        k, n = gy.shape[:2]
        groups = module.groups
        g = gy.reshape(k, n, groups, module.out_channels // groups, -1)
        if convention == "reduce":
            gs = g.sum(-1)
            return torch.einsum("kngb,kngc->gbc", gs, gs)
        return torch.matmul(g, g.transpose(-1, -2)).sum((0, 1))


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


def conv_patches(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a Conv1d/2d/3d, shape ``(n, C_in * prod(kernel), L)``.

    Padding is applied explicitly (any ``padding_mode``, ``padding="same"``);
    the windows are strided views copied once. The patch entries are in the
    order of the flattened weight ``(C_in, *kernel)``; the positions ``L`` in
    row-major order of the output.
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
    kfac_g = Conv2dRule.kfac_g

    def kfac_a(
        self, module: nn.Module, x: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """Per-group ``A`` of the patches; positions expanded (KFC) or reduced."""
        assert isinstance(module, nn.modules.conv._ConvNd)
        dim = len(module.kernel_size)
        if x.dim() != dim + 2:
            raise ValueError(
                f"{type(module).__name__} rule: expected a batched input (n, C, "
                f"{dim} spatial sizes), got {tuple(x.shape)}."
            )
        n, groups = x.shape[0], module.groups
        patches = conv_patches(module, x)
        patches = patches.reshape(n, groups, -1, patches.shape[-1])
        bias = module.bias is not None
        if convention == "reduce":
            pm = patches.mean(-1)
            return bordered(torch.einsum("ngd,nge->gde", pm, pm), pm.sum(0), n, bias)
        positions = patches.shape[-1]
        core = torch.matmul(patches, patches.transpose(-1, -2)).sum(0)
        return bordered(core, patches.sum((0, 3)), n * positions, bias) / positions

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
