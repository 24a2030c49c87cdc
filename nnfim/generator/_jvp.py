"""Forward-mode passes without the work of a zero input tangent.

PyTorch's forward-mode rule for ``addmm`` (``nn.Linear``) computes
``x_t W^T + x W_t^T + b_t`` and, when the input ``x`` carries no tangent
(the first layer: only the parameters have tangents), fills a zero ``x_t``
and multiplies it anyway (torch 2.13): a full extra matrix product and a
copy of the input's size per call. :func:`linear_tangents` gives such
layers a forward whose tangent skips that term.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_tangents"]


class _Linear(torch.autograd.Function):
    """``F.linear`` whose forward-mode tangent skips an absent input tangent."""

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None
        # absent tangents (and output gradients) arrive as None, not zeros
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if gy is None:
            return gx, gw, gb
        if ctx.needs_input_grad[0]:
            gx = gy @ weight
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb

    @staticmethod
    def jvp(
        ctx: Any,
        x_t: torch.Tensor | None,
        weight_t: torch.Tensor | None,
        bias_t: torch.Tensor | None,
    ) -> torch.Tensor:
        x, weight = ctx.saved_tensors
        out = None
        if weight_t is not None:
            out = F.linear(x, weight_t, bias_t)
        elif bias_t is not None:
            out = bias_t.expand(*x.shape[:-1], weight.shape[0]).clone()
        if x_t is not None:
            xw = F.linear(x_t, weight)
            out = xw if out is None else out + xw
        if out is None:
            out = x.new_zeros((*x.shape[:-1], weight.shape[0]))
        return out


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if fwAD.unpack_dual(x).tangent is not None:
        return F.linear(x, self.weight, self.bias)
    return _Linear.apply(x, self.weight, self.bias)


@contextlib.contextmanager
def linear_tangents(model: nn.Module) -> Iterator[None]:
    """Give the model's ``nn.Linear`` layers the forward of :class:`_Linear`.

    Only modules running ``nn.Linear.forward`` itself are changed (a subclass
    with its own forward, or a module whose forward is already replaced, is
    left alone); the originals come back on exit, also through an exception.
    """
    swapped = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear)
        and type(m).forward is nn.Linear.forward
        and "forward" not in vars(m)
    ]
    try:
        for m in swapped:
            m.forward = types.MethodType(_forward, m)  # type: ignore[method-assign]
        yield
    finally:
        for m in swapped:
            vars(m).pop("forward", None)
