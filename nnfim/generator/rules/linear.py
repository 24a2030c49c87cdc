"""Rule for ``nn.Linear`` on inputs of any rank."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from nnfim.generator.rules import _registry
from nnfim.generator.rules._registry import (
    LayerRule,
    add_into,
    bordered,
    register_rule,
    squares,
    write_or_add,
    xtx,
)


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """``y = x W^T + b``; extra leading dimensions (sequences) share the weights."""

    kronecker = True
    broadcastable = True

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example gradients, summed over shared positions."""
        k, n = gy.shape[:2]
        x3 = x.reshape(n, -1, x.shape[-1])
        g4 = gy.reshape(k, n, -1, gy.shape[-1])
        out = {"weight": torch.einsum("knto,nti->knoi", g4, x3)}
        if module.bias is not None:
            out["bias"] = g4.sum(2)
        return out

    def diag(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Without shared positions the diagonal is one matrix product of squares."""
        out: dict[str, torch.Tensor] = {}
        self.add_diag(module, x, gy, out)
        return out

    def add_diag(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        acc: dict[str, torch.Tensor],
        names: Collection[str] | None = None,
    ) -> None:
        """Without shared positions the product accumulates in place (``addmm_``).

        With shared positions, the per-example gradients ``G_n^T X_n`` are one
        batched product for a few examples at a time, squared in place.
        """
        weight = names is None or "weight" in names
        bias = module.bias is not None and (names is None or "bias" in names)
        self._add_diag(module, x, gy, acc, weight, bias, None)

    def add_diag_with_cross(
        self,
        module: nn.Module,
        x_diag: Any,
        x: torch.Tensor,
        gy: torch.Tensor,
        acc: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The squared output gradients, or the per-example gradients, serve both."""
        cross: dict[str, torch.Tensor] = {}
        self._add_diag(module, x, gy, acc, True, True, cross)
        return cross["weight"]

    def _add_diag(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        acc: dict[str, torch.Tensor],
        weight: bool,
        bias: bool,
        cross: dict[str, torch.Tensor] | None,
    ) -> None:
        """:meth:`add_diag`; with ``cross``, the weight-bias cross terms into it."""
        if x.dim() == 2:
            # one direction (Monte-Carlo, empirical): no sum over a size-1 dimension
            g2 = squares(gy[0]) if gy.shape[0] == 1 else squares(gy).sum(0)
            if weight and "weight" in acc:
                acc["weight"].addmm_(g2.t(), x * x)
            elif weight:  # a fresh product: nothing to clone
                acc["weight"] = g2.t() @ (x * x)
            if bias:
                add_into(acc, "bias", g2.sum(0), owned=True)
            if cross is not None:
                cross["weight"] = g2.t() @ x
            return
        # shared positions: the examples' gradients, a few examples at a time
        k, n = gy.shape[:2]
        o, i = gy.shape[-1], x.shape[-1]
        x3 = x.reshape(n, -1, i)
        g4 = gy.reshape(k, n, -1, o)
        b = g4.sum(2) if bias or cross is not None else None  # (K, n, o)
        if bias:
            assert b is not None
            add_into(acc, "bias", (b * b).sum((0, 1)), owned=True)
        if not weight:
            return
        if "weight" not in acc:
            acc["weight"] = gy.new_zeros(o, i)
        if cross is not None:
            cross["weight"] = gy.new_zeros(o, i)
        step = max(1, _registry.DEFAULT_CHUNK_ELEMENTS // max(k * o * i, 1))
        for start in range(0, n, step):
            sl = slice(start, start + step)
            # (K, c, o, T) @ (c, T, i): the examples' gradients, summed over positions
            grads = torch.matmul(g4[:, sl].transpose(-1, -2), x3[sl])
            if cross is not None:
                assert b is not None
                cross["weight"] += (grads * b[:, sl, :, None]).sum((0, 1))
            acc["weight"] += grads.square_().sum((0, 1))

    def flat_grads(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, names: list[str]
    ) -> torch.Tensor:
        """Per-example gradients as rows ``(K * n, numel)``."""
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if x.dim() != 2 or names != own:
            return super().flat_grads(module, x, gy, names)
        k, n = gy.shape[:2]
        rows = (gy[:, :, :, None] * x[None, :, None, :]).reshape(k * n, -1)
        if module.bias is None:
            return rows
        return torch.cat([rows, gy.reshape(k * n, -1)], 1)

    def outer_factors(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Without shared positions: ``gy`` and ``[x, 1]``; the bias is the last column."""
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if x.dim() != 2 or names != own:
            return None
        o, i = gy.shape[-1], x.shape[-1]
        index = torch.arange(o * i, device=x.device).reshape(o, i)
        if module.bias is None:
            return gy, x, index.reshape(-1)
        xa = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        bias = torch.arange(o * i, o * i + o, device=x.device)[:, None]
        return gy, xa, torch.cat([index, bias], 1).reshape(-1)

    def write_grads(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        names: list[str],
        out: torch.Tensor,
    ) -> None:
        """Written straight into ``out``'s columns, only the parameters ``names``.

        Without shared positions the weight's outer products are written in
        place (no temporary). A tied head lists only its bias, whose gradients
        are then all that is computed; a weight summed over shared positions
        takes the base class's product and copy.
        """
        if not set(names) <= {"weight", "bias"} or (x.dim() != 2 and "weight" in names):
            return super().write_grads(module, x, gy, names, out)
        k, n = gy.shape[:2]
        o = gy.shape[-1]
        start = 0
        for name in names:
            if name == "weight":
                i = x.shape[1]
                weight = out[..., start : start + o * i].view(k, n, o, i)
                torch.mul(gy[:, :, :, None], x[None, :, None, :], out=weight)
                start += o * i
            else:
                bias = gy if x.dim() == 2 else gy.reshape(k, n, -1, o).sum(2)
                out[..., start : start + o].copy_(bias)
                start += o

    def add_grad(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        name: str,
        out: torch.Tensor,
        overwrite: bool,
    ) -> None:
        """Outer products written or added in place, no temporary."""
        if x.dim() != 2:
            return super().add_grad(module, x, gy, name, out, overwrite)
        if name == "bias":
            write_or_add(out, gy, overwrite)
        elif overwrite:
            torch.mul(gy[:, :, :, None], x[None, :, None, :], out=out)
        else:
            out.addcmul_(gy[:, :, :, None], x[None, :, None, :])

    def gram(
        self,
        module: nn.Module,
        x1: torch.Tensor,
        gy1: torch.Tensor,
        x2: torch.Tensor,
        gy2: torch.Tensor,
        names: list[str],
    ) -> torch.Tensor:
        """``(gy1 . gy2) (x1 . x2 + 1)``: no per-example gradient is formed."""
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if x1.dim() != 2 or names != own:
            return super().gram(module, x1, gy1, x2, gy2, names)
        k1, n1 = gy1.shape[:2]
        k2, n2 = gy2.shape[:2]
        gg = (gy1.reshape(k1 * n1, -1) @ gy2.reshape(k2 * n2, -1).t()).reshape(
            k1, n1, k2, n2
        )
        xx = x1 @ x2.t()
        if module.bias is not None:
            xx = xx + 1
        return gg * xx[None, :, None, :]

    def weight_bias_cross(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> torch.Tensor:
        """Without shared positions: one product, like the diagonal."""
        if x.dim() != 2:
            return super().weight_bias_cross(module, x, gy)
        return (gy * gy).sum(0).t() @ x

    def kfac_a(
        self, module: nn.Module, x: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """``A`` from ``[x; 1]`` (the bias's input as a border).

        Shared positions are expanded (KFAC-expand: averaged) or reduced
        (KFAC-reduce: the input averaged over them first).
        """
        n = x.shape[0]
        bias = module.bias is not None
        x3 = x.reshape(n, -1, x.shape[-1])
        positions = x3.shape[1]
        if convention == "reduce" and positions > 1:
            xm = x3.mean(1)
            return bordered(xtx(xm)[None], xm.sum(0)[None], n, bias)
        # one position: both conventions agree, and no sum over a size-1
        # dimension (which zero-fills, then copies) is taken
        xf = x3.reshape(-1, x3.shape[-1])
        if bias:  # the moment written into its border's matrix: no copy
            d = xf.shape[1]
            a = xf.new_zeros(1, d + 1, d + 1)
            xtx(xf, out=a[0, :d, :d])
            total = xf.sum(0)
            a[0, :d, d] = total
            a[0, d, :d] = total
            a[0, d, d] = xf.shape[0]
        else:
            a = xtx(xf)[None]
        return a / positions if positions > 1 else a

    def kfac_g(
        self, module: nn.Module, gy: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """``G`` from the output gradients, summed over shared positions if reduced."""
        k, n = gy.shape[:2]
        positions = math.prod(gy.shape[2:-1])
        if convention == "reduce" and positions > 1:
            gs = gy.reshape(k, n, positions, -1).sum(2).reshape(k * n, -1)
            return xtx(gs)[None]
        return xtx(gy.reshape(-1, gy.shape[-1]))[None]

    def ekfac_diag(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        q_a: torch.Tensor,
        q_g: torch.Tensor,
    ) -> torch.Tensor:
        """Without shared positions: one product of rotated squares."""
        if x.dim() != 2:
            return super().ekfac_diag(module, x, gy, q_a, q_g)
        q = q_a[0]
        # [x, 1] @ Q_A without concatenating the column of ones
        xa = torch.addmm(q[-1], x, q[:-1]) if module.bias is not None else x @ q
        # the rotated tensors are this call's own: squared in place
        gg = (gy @ q_g[0]).square_().sum(0)
        return (gg.t() @ xa.square_())[None]
