"""Rule for ``nn.Conv1d/2d/3d`` (stride, padding of any mode, dilation, groups)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from nnfim.generator.rules import _registry
from nnfim.generator.rules._registry import (
    LayerRule,
    add_into,
    bordered,
    numel,
    register_rule,
    xtx,
)


def _windows(module: nn.modules.conv._ConvNd, xp: torch.Tensor) -> torch.Tensor:
    """Strided view of the windows, ``(n, C_in, *out_sizes, *kernel)``."""
    u = xp
    for d, (k, s, dil) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        u = u.unfold(2 + d, dil * (k - 1) + 1, s)[..., ::dil]
    return u


def conv_patches(module: nn.modules.conv._ConvNd, xp: torch.Tensor) -> torch.Tensor:
    """Input patches of a Conv1d/2d/3d, shape ``(n, C_in * prod(kernel), L)``.

    Args:
        module: the convolution.
        xp: its input with the padding applied (:func:`padded_input`),
            ``(n, C_in, *padded_sizes)``.

    The windows are strided views copied once (faster than ``F.unfold``, and
    defined for every number of spatial dimensions). The patch entries are in
    the order of the flattened weight ``(C_in, *kernel)``; the positions ``L``
    in row-major order of the output.
    """
    u = _windows(module, xp)
    dim = xp.dim() - 2
    spatial = list(range(2, 2 + dim))
    kernel = list(range(2 + dim, 2 + 2 * dim))
    n, c = xp.shape[:2]
    return u.permute(0, 1, *kernel, *spatial).reshape(
        n, c * math.prod(module.kernel_size), -1
    )


def grouped_patches(module: nn.modules.conv._ConvNd, xp: torch.Tensor) -> torch.Tensor:
    """Patches in the layout of ``A``'s products, ``(groups, a, n, L)``.

    ``a = C_in / groups * prod(kernel)``; ``xp`` is the padded input
    ``(n, C_in, ...)``.
    """
    u = _windows(module, xp)
    dim = xp.dim() - 2
    spatial = list(range(2, 2 + dim))
    kernel = list(range(2 + dim, 2 + 2 * dim))
    n, groups = xp.shape[0], module.groups
    positions = math.prod(u.shape[2 : 2 + dim])
    return u.permute(1, *kernel, 0, *spatial).reshape(groups, -1, n, positions)


#: Patch elements unfolded at a time (``A``, per-example gradients): a few
#: examples' patches stay in cache for their product and are not allocated
#: whole (2x faster than one unfold of a batch of 128 for ``A`` of the
#: benchmark CNN, CPU, torch 2.13).
PATCH_CHUNK_ELEMENTS = 1 << 20

#: Per-example weight gradients of a convolution whose patches are at most this
#: long (``C_in / groups * prod(kernel)``) are products with the unfolded patches; longer
#: ones are one grouped weight-gradient convolution, which needs no patches and
#: was 1.8x faster for 144 (2x slower for 27) on CPU, torch 2.13.
PATCH_PRODUCT_MAX = 64


#: Patch elements of a whole batch that :meth:`ConvRule.diag_input` unfolds once
#: for every output direction (32 MiB in float32); above, each direction
#: unfolds a few examples at a time.
PATCH_BATCH_ELEMENTS = 1 << 23


class Patched:
    """A padded input with its patches, unfolded once for every direction.

    Stands in for the padded input ``x`` of :meth:`ConvRule.diag`; slicing
    along examples slices both.
    """

    def __init__(self, xp: torch.Tensor, patches: torch.Tensor) -> None:
        self.xp = xp
        #: ``(n, groups, a, L)``
        self.patches = patches

    @property
    def shape(self) -> torch.Size:
        """The padded input's shape."""
        return self.xp.shape

    def __getitem__(self, sl: slice) -> Patched:
        return Patched(self.xp[sl], self.patches[sl])


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    """Per-example gradients direction by direction, without ``K`` input copies.

    ``prepare`` pads the input once per batch (any ``padding_mode``,
    ``padding="same"``); every other method receives the padded input.
    Kronecker factors follow KFC (Grosse and Martens, 2016): patches are the
    inputs, the spatial positions share the weights; ``A`` needs the inputs
    alone and ``G`` the output gradients alone.
    """

    kronecker = True

    def prepare(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The input with the padding applied, ``(n, C_in, *padded_sizes)``."""
        assert isinstance(module, nn.modules.conv._ConvNd)
        dim = len(module.kernel_size)
        if x.dim() != dim + 2:
            raise ValueError(
                f"{type(module).__name__} rule: expected a batched input (n, C, "
                f"{dim} spatial sizes), got {tuple(x.shape)}."
            )
        return padded_input(module, x)

    def weight_grads(
        self, module: nn.modules.conv._ConvNd, xp: torch.Tensor, gy: torch.Tensor
    ) -> torch.Tensor:
        """Per-example weight gradients of one direction, ``(n, *weight.shape)``.

        Args:
            module: the convolution.
            xp: padded input ``(n, C_in, ...)``.
            gy: output gradients of one direction ``(n, C_out, *out_sizes)``.
        """
        n, groups = xp.shape[0], module.groups
        shape = tuple(module.weight.shape)
        if isinstance(xp, Patched):
            g = gy.reshape(n, groups, module.out_channels // groups, -1)
            out = torch.matmul(xp.patches, g.transpose(-1, -2)).transpose(-1, -2)
            return out.reshape(n, *shape)
        if math.prod(shape[1:]) > PATCH_PRODUCT_MAX:
            return per_example_conv_weight(
                len(module.kernel_size),
                xp,
                gy,
                shape,
                module.stride,
                module.dilation,
                groups,
            )
        g = gy.reshape(n, groups, module.out_channels // groups, -1)
        a = math.prod(shape[1:])
        out = g.new_empty(n, groups, g.shape[2], a)
        # a few examples' patches at a time: no large buffer allocated (and
        # page-faulted) per direction, and they stay in cache for the product
        step = max(1, PATCH_CHUNK_ELEMENTS // max(groups * a * g.shape[-1], 1))
        for start in range(0, n, step):
            sl = slice(start, start + step)
            patches = conv_patches(module, xp[sl])
            patches = patches.reshape(-1, groups, a, g.shape[-1])
            # (a, L) @ (L, b): 1.5x faster than (b, L) @ (L, a) for a = 27, b = 16
            out[sl] = torch.matmul(patches, g[sl].transpose(-1, -2)).transpose(-1, -2)
        return out.reshape(n, *shape)

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of shape ``(K, n, C_out, C_in / groups, *kernel)`` (and bias)."""
        assert isinstance(module, nn.modules.conv._ConvNd)
        weight = torch.stack([self.weight_grads(module, x, g) for g in gy])
        out = {"weight": weight}
        if module.bias is not None:
            out["bias"] = gy.flatten(3).sum(-1)
        return out

    def diag_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | Patched:
        """Short patches of a batch that fits ``PATCH_BATCH_ELEMENTS``, unfolded once."""
        assert isinstance(module, nn.modules.conv._ConvNd)
        a = math.prod(module.weight.shape[1:])
        if a > PATCH_PRODUCT_MAX:
            return x
        positions = math.prod(_windows(module, x[:1]).shape[2 : x.dim()])  # a view
        if x.shape[0] * module.groups * a * positions > PATCH_BATCH_ELEMENTS:
            return x
        patches = conv_patches(module, x)
        return Patched(x, patches.reshape(x.shape[0], module.groups, a, -1))

    def diag(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Squares summed direction by direction: ``(n, p)`` gradients at a time."""
        weight, _ = self._squares(module, x, gy, cross=False)
        out = {"weight": weight}
        if module.bias is not None:
            b = gy.flatten(3).sum(-1)
            out["bias"] = (b * b).sum((0, 1))
        return out

    def add_diag_with_cross(
        self,
        module: nn.Module,
        x_diag: Any,
        x: torch.Tensor,
        gy: torch.Tensor,
        acc: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Each direction's per-example weight gradients serve both sums."""
        weight, cross = self._squares(module, x_diag, gy, cross=True)
        add_into(acc, "weight", weight, owned=True)
        b = gy.flatten(3).sum(-1)
        add_into(acc, "bias", (b * b).sum((0, 1)), owned=True)
        assert cross is not None
        return cross

    def _squares(
        self, module: nn.Module, x: Any, gy: torch.Tensor, cross: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sums of squared per-example weight gradients.

        With ``cross``, also the sums of their products with the bias
        gradients: the quasi-diagonal's cross terms.
        """
        assert isinstance(module, nn.modules.conv._ConvNd)
        weight = torch.zeros_like(module.weight, dtype=gy.dtype)
        total = torch.zeros_like(weight) if cross else None
        step = max(1, _registry.DEFAULT_CHUNK_ELEMENTS // max(numel(module), 1))
        for start in range(0, x.shape[0], step):
            xc = x[start : start + step]
            for g in gy[:, start : start + step]:
                w = self.weight_grads(module, xc, g)
                if total is not None:
                    b = g.flatten(2).sum(-1)  # (n, C_out): the bias gradients
                    total += (w * b.reshape(*b.shape, *[1] * (w.dim() - 2))).sum(0)
                weight += w.square_().sum(0)
        return weight, total

    def kfac_a(
        self, module: nn.Module, x: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """Per-group ``A`` of the patches; positions expanded (KFC) or reduced.

        The patches are unfolded a few examples at a time, straight into the
        ``(groups, a, examples * positions)`` layout of one matrix product per
        group (symmetric: its upper blocks only, see ``xtx``); the bias's
        constant input enters as a border instead of a row of ones.
        """
        assert isinstance(module, nn.modules.conv._ConvNd)
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


def padded_input(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The input with the convolution's padding applied explicitly (any mode)."""
    pad = module._reversed_padding_repeated_twice
    if not any(pad):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pad, mode=mode)
