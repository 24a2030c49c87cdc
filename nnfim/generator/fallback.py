"""Layers without a usable rule: per-example gradients through ``torch.func``.

A layer falls back when no rule is registered for its type, when it is never
called as a module (its weights used functionally, e.g. ``MultiheadAttention``'s
``out_proj``), when its output does not follow the batch (a positional
embedding broadcast over it), or when one of its parameters is also held by
a module that has no rule or is never called. Tied weights and reused modules
whose every use is a module call with a rule go through the rules instead
(:mod:`nnfim.generator.shared`). Its per-example gradients ``J_i^T d_ki`` are
computed by ``vmap`` over examples of a ``vjp`` of the whole model with respect
to those parameters, which accounts for every use of them. Every representation
follows from these rows (K-FAC holds such a layer as an exact block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from nnfim.generator.rules._registry import LayerRule
from nnfim.layers import LayerEntry

__all__ = ["FallbackRule", "fallback_rows"]


class FallbackRule(LayerRule):
    """Rule of a fallback layer: ``gy`` already holds its per-example rows.

    The generator hands ``gy`` of shape ``(K, n, p_l)`` (the layer's
    parameters flattened in collection order) and an empty ``x``.
    """

    def __init__(self, layer: LayerEntry, reason: str) -> None:
        self.layer = layer
        self.reason = reason

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Split the precomputed rows by parameter."""
        out, start = {}, 0
        for name, shape in self.layer.params:
            size = math.prod(shape)
            out[name] = gy[:, :, start : start + size].reshape(*gy.shape[:2], *shape)
            start += size
        return out

    def flat_grads(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, names: list[str]
    ) -> torch.Tensor:
        """The precomputed rows, ``(K * n, p_l)``."""
        return gy.reshape(-1, gy.shape[-1])

    def _chunks(self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor):
        yield x, gy


def fallback_rows(
    forward_one: Callable[[dict[str, torch.Tensor], Any], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    examples: Any,
    directions: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-example rows ``J_i^T d_ki`` for ``params``.

    Args:
        forward_one: ``(params, example) -> outputs (C,)`` for one example
            (no batch dimension), the other parameters left as they are.
        params: qualified name -> parameter (detached values are used).
        examples: the batch, vmapped over its leading dimension.
        directions: ``(K, n, C)``.

    Returns:
        Qualified name -> ``(K, n, *shape)``.
    """
    primals = {k: p.detach() for k, p in params.items()}

    def one(example: Any, d: torch.Tensor) -> dict[str, torch.Tensor]:
        pullback = vjp(lambda p: forward_one(p, example), primals)[1]
        return vmap(pullback)(d)[0]

    try:
        rows = vmap(one)(examples, directions.transpose(0, 1))
    except RuntimeError:
        # Some modules (recurrent layers) have no batching rule: loop instead.
        return _looped_rows(forward_one, params, examples, directions)
    return {k: g.transpose(0, 1) for k, g in rows.items()}


def _looped_rows(
    forward_one: Callable[[dict[str, torch.Tensor], Any], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    examples: Any,
    directions: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The same rows, one example and one direction at a time."""
    k, n = directions.shape[:2]
    names = list(params)
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i in range(n):
        example = (
            examples[i]
            if isinstance(examples, torch.Tensor)
            else type(examples)(t[i] for t in examples)
        )
        with torch.enable_grad():
            f = forward_one(leaves, example)
            for j in range(k):
                grads = torch.autograd.grad(
                    f,
                    [leaves[m] for m in names],
                    directions[j, i],
                    retain_graph=j < k - 1,
                    allow_unused=True,
                )
                for name, g in zip(names, grads, strict=True):
                    out[name].append(torch.zeros_like(leaves[name]) if g is None else g)
    return {
        name: torch.stack(rows).reshape(n, k, *params[name].shape).transpose(0, 1)
        for name, rows in out.items()
    }


def call_one(
    model: nn.Module, function: Any, params: dict[str, torch.Tensor], example: Any
) -> torch.Tensor:
    """The model's outputs for one example (a batch of one, flattened to ``(C,)``)."""
    batch = (
        example[None]
        if isinstance(example, torch.Tensor)
        else type(example)(t[None] for t in example)
    )
    if function is None:
        out = functional_call(model, params, (batch,))
    else:
        from nnfim.generator.jacobian import _Bound

        bound = _Bound(model, function)
        out = functional_call(
            bound, {f"model.{k}": v for k, v in params.items()}, (batch,)
        )
    return out.reshape(-1)
