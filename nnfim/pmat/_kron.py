"""Shared plumbing of the Kronecker-structured matrices (KFAC, EKFAC).

A Kronecker layer has a weight of shape ``(groups * b, ...)`` and an
optional bias ``(groups * b,)``, in that order (``weight`` / ``bias``, or e.g.
attention's ``in_proj_weight`` / ``in_proj_bias``). Per group its parameters form a
``(b, a)`` matrix ``V`` whose last column is the bias; with row-major
``vec``, ``(G kron A) vec(V) = vec(G V A)`` for symmetric ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from nnfim.layers import LayerCollection, LayerEntry


def to_matrix(entry: LayerEntry, flat: torch.Tensor, groups: int) -> torch.Tensor:
    """A layer's flat parameters ``(p_l,)`` as per-group matrices ``(groups, b, a)``."""
    weight_shape = entry.params[0][1]
    n_weight = math.prod(weight_shape)
    b = weight_shape[0] // groups
    parts = [flat[:n_weight].reshape(groups, b, -1)]
    if len(entry.params) == 2:
        parts.append(flat[n_weight:].reshape(groups, b, 1))
    return torch.cat(parts, -1)


def from_matrix(entry: LayerEntry, mat: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_matrix`: ``(groups, b, a)`` -> ``(p_l,)``."""
    if len(entry.params) == 1:
        return mat.reshape(-1)
    return torch.cat([mat[..., :-1].reshape(-1), mat[..., -1].reshape(-1)])


def kron_order(entry: LayerEntry, groups: int, device: torch.device) -> torch.Tensor:
    """Flat positions of the layer's parameters listed in Kronecker order."""
    index = torch.arange(entry.numel, device=device, dtype=torch.float64)
    return to_matrix(entry, index, groups).reshape(-1).long()


def scatter_block(
    entry: LayerEntry, groups: int, kron_blocks: list[torch.Tensor]
) -> torch.Tensor:
    """A ``(p_l, p_l)`` block from per-group matrices in Kronecker order."""
    full = torch.block_diag(*kron_blocks)
    order = kron_order(entry, groups, full.device)
    out = torch.empty_like(full)
    out[order[:, None], order[None, :]] = full
    return out


def check_kronecker_layer(entry: LayerEntry) -> None:
    """Raise ``ValueError`` when a layer cannot hold Kronecker factors."""
    names = [p for p, _ in entry.params]
    shapes = [s for _, s in entry.params]
    ok = len(shapes) in (1, 2) and len(shapes[0]) >= 2
    if len(shapes) == 2:
        ok = ok and shapes[1] == (shapes[0][0],)
    if not ok:
        raise ValueError(
            f"layer {entry.name!r} has parameters {names}; Kronecker factors need "
            "a weight of rank >= 2 and an optional bias, one per output."
        )


def split_layers(
    lc: LayerCollection, kron: Mapping[str, object], blocks: Mapping[str, torch.Tensor]
) -> None:
    """Check that every layer is either Kronecker or an exact block, once."""
    names = set(lc.layer_names)
    both = set(kron) & set(blocks)
    missing = names - set(kron) - set(blocks)
    extra = (set(kron) | set(blocks)) - names
    if both or missing or extra:
        raise ValueError(
            f"layers must be Kronecker or dense exactly once: in both {sorted(both)}, "
            f"missing {sorted(missing)}, unknown {sorted(extra)}."
        )
    for name in kron:
        check_kronecker_layer(lc[name])
    for name, block in blocks.items():
        p = lc[name].numel
        if tuple(block.shape) != (p, p):
            raise ValueError(
                f"block {name!r} has shape {tuple(block.shape)}, expected ({p}, {p})."
            )
