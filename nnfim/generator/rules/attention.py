"""Rule for ``nn.MultiheadAttention`` (self-attention with packed projections).

``MultiheadAttention`` computes its input projection and calls ``out_proj``
functionally, so module hooks see neither. During nnfim's passes
:func:`decomposed_attention` gives each supported instance a forward that
computes the same function in visible steps: the packed projection
``qkv = x W_in^T + b_in`` is recorded for the attention layer itself (a Linear
map on sequences: its rule, Kronecker factors included, apply), attention runs
through ``scaled_dot_product_attention`` (or an explicit softmax when weights
are asked for), and ``out_proj`` is called as a module, so the Linear rule
covers it. Instances that do not fit (cross-attention, separate q/k/v weights,
``bias_k``/``bias_v``, ``add_zero_attn``, dropout in train mode) keep their own
forward, and their parameters fall back to ``torch.func``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnfim.generator.rules._registry import LayerRule, register_rule
from nnfim.generator.rules.linear import LinearRule

#: ``record(module, x, y) -> y'``: set by the layer capture during a pass.
RECORDER: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "nnfim_recorder", default=None
)

#: Attention modules whose forward records its own projection (no hook needed).
SELF_RECORDING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _decomposable(m: nn.MultiheadAttention) -> bool:
    return (
        m._qkv_same_embed_dim
        and m.in_proj_weight is not None
        and m.bias_k is None
        and not m.add_zero_attn
        and (m.dropout == 0.0 or not m.training)
    )


def _forward(
    self: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    plain = attn_mask is None or attn_mask.dim() == 2
    if not (query is key and key is value) or query.dim() != 3 or not plain:
        return type(self).forward(
            self,
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )
    x = query if self.batch_first else query.transpose(0, 1)
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
    recorder = RECORDER.get()
    if recorder is not None:
        qkv = recorder(self, x, qkv)
    n, t, d = x.shape
    h = self.num_heads
    q, k, v = (z.reshape(n, t, h, d // h).transpose(1, 2) for z in qkv.chunk(3, -1))
    mask = _merged_mask(attn_mask, key_padding_mask, is_causal, t, q.dtype, q.device)
    if need_weights:
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, -1)
        attn = weights @ v
    else:
        weights = None
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = self.out_proj(attn.transpose(1, 2).reshape(n, t, d))
    if not self.batch_first:
        out = out.transpose(0, 1)
    if weights is not None and average_attn_weights:
        weights = weights.mean(1)
    return out, weights


def _merged_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    t: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """One additive float mask ``(n or 1, 1 or heads, t, t)`` from torch's mask arguments."""
    mask = None
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
    for m, shape in ((attn_mask, None), (key_padding_mask, "padding")):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
                m, float("-inf")
            )
        m = m.to(dtype)
        if shape == "padding":
            m = m[:, None, None, :]
        mask = m if mask is None else mask + m
    return mask


@contextlib.contextmanager
def decomposed_attention(model: nn.Module) -> Iterator[None]:
    """Give the model's supported attention modules the visible-steps forward."""
    swapped = []
    for m in model.modules():
        if (
            isinstance(m, nn.MultiheadAttention)
            and _decomposable(m)
            and "forward" not in vars(m)
        ):
            m.forward = types.MethodType(_forward, m)  # type: ignore[method-assign]
            swapped.append(m)
            SELF_RECORDING.add(m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward
            SELF_RECORDING.discard(m)


class _InProj(nn.Module):
    """The packed projection seen as an ``nn.Linear`` (for the Linear rule)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        assert isinstance(module, nn.MultiheadAttention)
        self.weight = module.in_proj_weight
        self.bias = module.in_proj_bias


@register_rule(nn.MultiheadAttention)
class AttentionRule(LayerRule):
    """The packed input projection of self-attention, as a Linear map on sequences."""

    kronecker = True
    _linear = LinearRule()

    @staticmethod
    def _names(module: nn.Module) -> dict[str, str]:
        return {"weight": "in_proj_weight", "bias": "in_proj_bias"}

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example gradients of ``in_proj_weight`` and ``in_proj_bias``."""
        grads = self._linear.per_example_grad(_InProj(module), x, gy)
        return {self._names(module)[k]: g for k, g in grads.items()}

    def diag(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Through the Linear rule (summed over positions)."""
        grads = self._linear.diag(_InProj(module), x, gy)
        return {self._names(module)[k]: g for k, g in grads.items()}

    def kfac_a(
        self, module: nn.Module, x: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """The Linear rule's ``A`` of the packed projection."""
        return self._linear.kfac_a(_InProj(module), x, convention)

    def kfac_g(
        self, module: nn.Module, gy: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """The Linear rule's ``G`` of the packed projection."""
        return self._linear.kfac_g(_InProj(module), gy, convention)

    def ekfac_diag(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        q_a: torch.Tensor,
        q_g: torch.Tensor,
    ) -> torch.Tensor:
        """The Linear rule's refit of the packed projection."""
        return self._linear.ekfac_diag(_InProj(module), x, gy, q_a, q_g)
