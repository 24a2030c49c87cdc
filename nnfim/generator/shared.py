"""Layers whose parameters have several uses: tied weights and reused modules.

A layer's parameters may be used by several calls in one forward pass: its
module called several times (a reused module), or a parameter held by other
modules too (a token embedding tied to the output head, one weight shared by
two ``nn.Linear``). Every such use is a module call with a rule: the hooks
record its input and output, the batched backward gives its output gradients,
and the layer's per-example gradient is the **sum over uses** of each use's
per-example gradient, mapped to the owner's parameter names (a parameter is
one tensor, so its layout is the same in every module holding it).

Quantities quadratic in the per-example gradient need the square of the sum,
not the sum of squares: the diagonal is ``sum_u diag_u + 2 sum_{u<w} cross_uw``,
each use's diagonal from its rule's fast path, the cross terms from fast paths
(two ``nn.Linear`` calls without positions; a tied ``nn.Embedding`` and
``nn.Linear``: only the rows of the looked-up tokens meet) or, otherwise, from
per-example gradients in chunks of bounded size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nnfim.generator.rules._registry import (
    DEFAULT_CHUNK_ELEMENTS,
    LayerRule,
    add_diag_of,
    held_params,
)
from nnfim.generator.rules.attention import AttentionRule
from nnfim.generator.rules.embedding import EmbeddingRule
from nnfim.generator.rules.linear import LinearRule
from nnfim.layers import LayerEntry

__all__ = ["SharedRule", "Site", "Use", "Uses"]

#: Rules whose inputs are ``(n, positions..., features)`` (tokens for the
#: embedding): several calls of one module stack as more positions.
_POSITIONAL = (LinearRule, AttentionRule, EmbeddingRule)


@dataclass(frozen=True, eq=False)
class Site:
    """A module holding some of a layer's parameters.

    Attributes:
        name: the module's qualified name.
        module: the module.
        rule: its rule.
        params: ``(name in the module, name in the owner layer)`` pairs.
    """

    name: str
    module: nn.Module
    rule: LayerRule
    params: tuple[tuple[str, str], ...]


@dataclass(frozen=True, eq=False)
class Use:
    """One call of a site: its prepared input ``(n, ...)`` and output gradients ``(K, n, ...)``."""

    site: Site
    x: torch.Tensor
    gy: torch.Tensor


class Uses:
    """Every use of one layer in one batch, sliced together by examples.

    Stands in for a layer's input ``x`` in the generator's passes (its output
    gradients are then an empty ``(K, n, 0)`` tensor, sliced alongside):
    ``uses[sl]`` keeps the examples ``sl`` of every use.
    """

    def __init__(self, items: list[Use]) -> None:
        self.items = items

    def __getitem__(self, sl: slice) -> Uses:
        return Uses([Use(u.site, u.x[sl], u.gy[:, sl]) for u in self.items])

    def directions(self, sl: slice) -> Uses:
        """The uses with only the output directions ``sl``."""
        return Uses([Use(u.site, u.x, u.gy[sl]) for u in self.items])

    def detach(self) -> Uses:
        """The uses with their tensors detached."""
        return Uses([Use(u.site, u.x.detach(), u.gy.detach()) for u in self.items])

    def numel(self) -> int:
        """Elements held: every use's input and output gradients."""
        return sum(u.x.numel() + u.gy.numel() for u in self.items)

    @property
    def kn(self) -> tuple[int, int]:
        """``(K, n)``."""
        gy = self.items[0].gy
        return gy.shape[0], gy.shape[1]


def _grads(use: Use) -> dict[str, torch.Tensor]:
    """One use's per-example gradients keyed by the owner's parameter names."""
    grads = use.site.rule.per_example_grad(use.site.module, use.x, use.gy)
    return {owner: grads[own] for own, owner in use.site.params}


class SharedRule(LayerRule):
    """Rule of a layer with several uses: sums its uses' per-example gradients.

    The generator hands ``x`` as :class:`Uses` and ``gy`` as an empty
    ``(K, n, 0)`` tensor; ``module`` is the owner and is not read.
    """

    def __init__(self, layer: LayerEntry, sites: list[Site]) -> None:
        self.layer = layer
        self.sites = sites

    def kronecker_sites(self, calls: dict[str, int]) -> bool:
        """Whether every use gives a Kronecker term in the owner's layout.

        Each site's rule has Kronecker factors, maps its weight to the owner's
        weight (and its bias, if any, to the owner's bias or to nothing), and a
        site called several times has a positional rule (Linear, attention,
        Embedding), whose calls stack as positions.

        Args:
            calls: calls per module name in one forward pass.
        """
        owner = [p for p, _ in self.layer.params]
        for site in self.sites:
            own = [p for p, _ in site.module.named_parameters(recurse=False)]
            mapping = dict(site.params)
            if not site.rule.kronecker or len(own) not in (1, 2) or len(owner) > 2:
                return False
            if mapping.get(own[0]) != owner[0]:
                return False
            if len(own) == 2 and mapping.get(own[1]) not in (None, *owner[1:]):
                return False
            if calls.get(site.name, 0) > 1 and not isinstance(site.rule, _POSITIONAL):
                return False
        return True

    def kfac_terms(
        self, x: Uses, convention: str
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One Kronecker term ``(A, G)`` per site, in the owner's layout, summed over examples.

        A site's calls are stacked as positions (a module called ``T`` times is
        weight sharing over ``T`` positions) and go through its rule's
        :meth:`~LayerRule.kfac_factors` once, in either convention. A site's
        own bias that is not the owner's is left out of ``A``; the owner's bias
        that a site does not use gets a zero row and column.
        """
        owner_bias = len(self.layer.params) == 2
        out = []
        for site in self.sites:
            calls = [u for u in x.items if u.site is site]
            k, n = calls[0].gy.shape[:2]
            if len(calls) == 1:
                xs, gy = calls[0].x, calls[0].gy
            else:
                embedding = isinstance(site.rule, EmbeddingRule)
                xs = torch.cat(
                    [
                        u.x.reshape(n, -1)
                        if embedding
                        else u.x.reshape(n, -1, u.x.shape[-1])
                        for u in calls
                    ],
                    1,
                )
                gy = torch.cat(
                    [u.gy.reshape(k, n, -1, u.gy.shape[-1]) for u in calls], 2
                )
            a, g = site.rule.kfac_factors(site.module, xs, gy, convention)
            own = [p for p, _ in site.module.named_parameters(recurse=False)]
            shared_bias = len(own) == 2 and own[1] in dict(site.params)
            if (
                len(own) == 2
                and not shared_bias
                and not isinstance(site.rule, EmbeddingRule)
            ):
                a = a[:, :-1, :-1]
            if owner_bias and not shared_bias:
                a = torch.nn.functional.pad(a, (0, 1, 0, 1))
            out.append((a, g))
        return out

    def ekfac_diag(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        q_a: torch.Tensor,
        q_g: torch.Tensor,
    ) -> torch.Tensor:
        """Second moments of the summed per-example gradients in the eigenbasis."""
        groups, b = q_g.shape[:2]
        names = [p for p, _ in self.layer.params]
        total = torch.zeros(groups, b, q_a.shape[1], dtype=q_a.dtype, device=q_a.device)
        for xc, gc in self._chunks(module, x, gy):
            assert isinstance(xc, Uses)
            grads = self.per_example_grad(module, xc, gc)  # type: ignore[arg-type]
            k, n = xc.kn
            parts = [grads[names[0]].reshape(k, n, groups, b, -1)]
            if len(names) == 2:
                parts.append(grads[names[1]].reshape(k, n, groups, b, 1))
            mat = torch.cat(parts, -1)
            rotated = torch.einsum("gbc,kngbd,gde->kngce", q_g, mat, q_a)
            total += (rotated * rotated).sum((0, 1))
        return total

    def _pieces(self, uses: Uses) -> Iterator[Uses]:
        """Slices over examples and directions of at most the chunk budget."""
        k, n = uses.kn
        width = max(self.layer.numel, 1)
        per_direction = max(1, DEFAULT_CHUNK_ELEMENTS // width)
        kstep = min(k, per_direction)
        nstep = max(1, per_direction // kstep)
        for ks in range(0, k, kstep):
            sub = uses.directions(slice(ks, ks + kstep)) if kstep < k else uses
            for ns in range(0, n, nstep):
                yield sub[ns : ns + nstep] if nstep < n else sub

    def _chunks(self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor):
        assert isinstance(x, Uses)
        k, n = x.kn
        step = max(1, DEFAULT_CHUNK_ELEMENTS // max(k * self.layer.numel, 1))
        for start in range(0, n, step):
            sl = slice(start, start + step)
            yield x[sl], gy[:, sl]

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The sum over uses, ``(K, n, *shape)`` per owner parameter."""
        assert isinstance(x, Uses)
        out: dict[str, torch.Tensor] = {}
        for use in x.items:
            for name, g in _grads(use).items():
                out[name] = out[name] + g if name in out else g
        return out

    def flat_grads(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, names: list[str]
    ) -> torch.Tensor:
        """Rows ``(K * n, p_l)`` of the summed per-example gradients."""
        assert isinstance(x, Uses)
        grads = self.per_example_grad(module, x, gy)
        k, n = x.kn
        return torch.cat([grads[p].reshape(k * n, -1) for p in names], 1)

    def write_grads(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        names: list[str],
        out: torch.Tensor,
    ) -> None:
        """Every use adds into the owner's columns of ``out``; the first writes.

        Dense uses (a tied head's outer products) go first, so no column is
        zeroed and no summed copy is formed; sparse ones (embedding lookups)
        then add their few rows.
        """
        assert isinstance(x, Uses)
        k, n = x.kn
        shapes = dict(self.layer.params)
        views, start = {}, 0
        for name in names:
            size = math.prod(shapes[name])
            views[name] = out[..., start : start + size].view(k, n, *shapes[name])
            start += size
        fresh = set(names)
        for use in sorted(x.items, key=lambda u: u.site.rule.sparse_grads):
            for own, owner in use.site.params:
                if owner in views:
                    use.site.rule.add_grad(
                        use.site.module,
                        use.x,
                        use.gy,
                        own,
                        views[owner],
                        owner in fresh,
                    )
                    fresh.discard(owner)
        for name in fresh:  # held by no use of this batch
            views[name].zero_()

    def diag(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``sum_u diag_u + 2 sum_{u<w} cross_uw``, per owner parameter."""
        assert isinstance(x, Uses)
        out: dict[str, torch.Tensor] = {}

        def add(parts: dict[str, torch.Tensor], scale: float) -> None:
            for name, d in parts.items():
                d = d if scale == 1.0 else scale * d
                out[name] = out[name] + d if name in out else d

        items = x.items
        for i, u in enumerate(items):
            d: dict[str, torch.Tensor] = {}
            held = held_params(u.site.module, [own for own, _ in u.site.params])
            add_diag_of(u.site.rule, u.site.module, u.x, u.gy, d, held)
            add({owner: d[own] for own, owner in u.site.params}, 1.0)
            for w in items[i + 1 :]:
                add(self._cross(u, w), 2.0)
        return out

    def _cross(self, u: Use, w: Use) -> dict[str, torch.Tensor]:
        """``sum_{k,i} g_u[k, i] * g_w[k, i]`` for the parameters both uses hold."""
        common = {o for _, o in u.site.params} & {o for _, o in w.site.params}
        if not common:
            return {}
        fast = _cross_linear(u, w, common)
        if fast is None:
            fast = _cross_embedding(u, w, common)
        if fast is None:
            fast = _cross_embedding(w, u, common)
        if fast is not None:
            return fast
        out: dict[str, torch.Tensor] = {}
        for piece in self._pieces(Uses([u, w])):
            pu, pw = piece.items
            gu, gw = _grads(pu), _grads(pw)
            for name in common:
                c = (gu[name] * gw[name]).sum((0, 1))
                out[name] = out[name] + c if name in out else c
        return out


def _plain_linear(use: Use) -> bool:
    return type(use.site.rule) is LinearRule and isinstance(use.site.module, nn.Linear)


def _cross_linear(u: Use, w: Use, common: set[str]) -> dict[str, torch.Tensor] | None:
    """Two ``nn.Linear`` calls without positions: ``(gy_u gy_w)^T (x_u x_w)``."""
    if not (_plain_linear(u) and _plain_linear(w) and u.x.dim() == w.x.dim() == 2):
        return None
    uw, ww = dict(u.site.params), dict(w.site.params)
    gg = (u.gy * w.gy).sum(0)
    out = {}
    if "weight" in uw and uw["weight"] == ww.get("weight"):
        out[uw["weight"]] = gg.t() @ (u.x * w.x)
    if "bias" in uw and uw["bias"] == ww.get("bias"):
        out[uw["bias"]] = gg.sum(0)
    return out if set(out) == common else None


def _cross_embedding(
    e: Use, lin: Use, common: set[str]
) -> dict[str, torch.Tensor] | None:
    """An ``nn.Embedding`` and an ``nn.Linear`` sharing the weight ``(V, d)``.

    The embedding's per-example gradient lives on the rows of the example's
    tokens (its slot sums, ``(K, n, T, d)``); the Linear's rows there are
    ``sum_s gy[k, i, s, v] x[i, s]`` over the Linear's positions ``s``.
    """
    if not (
        isinstance(e.site.rule, EmbeddingRule)
        and isinstance(e.site.module, nn.Embedding)
        and _plain_linear(lin)
        and common == {dict(e.site.params)["weight"]}
        and dict(lin.site.params).get("weight") in common
    ):
        return None
    tokens, sums = e.site.rule.slot_sums(e.site.module, e.x, e.gy)
    k, n, t, d = sums.shape
    x = lin.x.reshape(n, -1, d)  # (n, S, d)
    gy = lin.gy.reshape(k, n, x.shape[1], -1)  # (K, n, S, V)
    index = tokens[None, :, None, :].expand(k, n, x.shape[1], t)
    picked = gy.gather(3, index)  # (K, n, S, T): gy at the tokens' rows
    # sum_k (sum_s picked x) * sums: 2 to 10 x faster than the three-way einsum
    rows = torch.matmul(picked.transpose(-1, -2), x).mul_(sums).sum(0)
    out = rows.new_zeros(e.site.module.num_embeddings, d)
    out.index_add_(0, tokens.reshape(-1), rows.reshape(-1, d))
    return {next(iter(common)): out}
