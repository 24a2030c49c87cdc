"""Rule for ``nn.Linear`` on inputs of any rank."""

from __future__ import annotations

import torch
from torch import nn

from nnfim.generator.rules._registry import LayerRule, register_rule


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """``y = x W^T + b``; extra leading dimensions (sequences) share the weights."""

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
        if x.dim() != 2:
            return super().diag(module, x, gy)
        g2 = (gy * gy).sum(0)
        out = {"weight": g2.t() @ (x * x)}
        if module.bias is not None:
            out["bias"] = g2.sum(0)
        return out

    def flat_grads(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, names: list[str]
    ) -> torch.Tensor:
        """Per-example gradients as rows ``(K * n, numel)``."""
        if x.dim() != 2 or names != [
            n for n, _ in module.named_parameters(recurse=False)
        ]:
            return super().flat_grads(module, x, gy, names)
        k, n = gy.shape[:2]
        rows = (gy[:, :, :, None] * x[None, :, None, :]).reshape(k * n, -1)
        if module.bias is None:
            return rows
        return torch.cat([rows, gy.reshape(k * n, -1)], 1)
