"""The layer-rule registry and the base rule with its derived defaults."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

__all__ = ["LayerRule", "find_rule", "register_rule", "registered_types"]

_RULES: dict[type[nn.Module], LayerRule] = {}

#: Upper bound, in elements, of per-example gradients held at once by the
#: default derived quantities (chunks over examples).
DEFAULT_CHUNK_ELEMENTS = 1 << 24

R = TypeVar("R", bound="type[LayerRule]")


def write_or_add(out: torch.Tensor, g: torch.Tensor, overwrite: bool) -> None:
    """``out = g`` (``overwrite``) or ``out += g``, in place."""
    if overwrite:
        out.copy_(g)
    else:
        out.add_(g)


def add_into(
    acc: dict[str, torch.Tensor], name: str, value: torch.Tensor, *, owned: bool = False
) -> None:
    """``acc[name] += value`` in place, or store ``value`` as the first term.

    The first term is cloned unless ``owned`` (a fresh tensor of the
    caller's): it may view a tensor the running sum must not write into.
    """
    if name in acc:
        acc[name].add_(value)
    else:
        acc[name] = value if owned else value.clone()


def squares(t: torch.Tensor) -> torch.Tensor:
    """``t * t`` with the squares up to the dtype's smallest normal number zeroed.

    An example whose output gradients are all tiny (a confident softmax that
    sampled its top class) squares to subnormal numbers, which x86 CPUs
    multiply on a slow path: in the transformer benchmark's Monte-Carlo
    diagonal, the head's product of squares (about 6,000 subnormal of 32,000)
    took 8 to 15 x the time of the same product with them zeroed. Each term
    zeroed is at most
    ``finfo.tiny``, where the dtype has lost precision already. Used for the
    output-gradient side (layer inputs are rarely that small, and a further
    pass over them cost the MLP's diagonal about 5 %).
    """
    sq = t * t
    if sq.is_floating_point():  # one fused pass: sq if sq > tiny else 0
        torch.threshold_(sq, torch.finfo(sq.dtype).tiny, 0.0)
    return sq


def held_params(module: nn.Module, wanted: Collection[str]) -> list[str] | None:
    """``wanted`` where ``module`` holds parameters beyond it (a tied weight), else None."""
    own = {p for p, _ in module.named_parameters(recurse=False)}
    return None if own <= set(wanted) else list(wanted)


def add_diag_of(
    rule: LayerRule,
    module: nn.Module,
    x: Any,
    gy: torch.Tensor,
    acc: dict[str, torch.Tensor],
    names: Collection[str] | None,
) -> None:
    """``rule.add_diag``, given ``names`` only where they select (see :func:`held_params`).

    A rule written before ``names`` existed keeps working for every module
    that holds only its layer's parameters.
    """
    if names is None:
        rule.add_diag(module, x, gy, acc)
    else:
        rule.add_diag(module, x, gy, acc, names)


class LayerRule:
    """Turns a layer's inputs and output gradients into curvature quantities.

    Shapes: ``x`` is the layer input ``(n, ...)``; ``gy`` holds the gradients of
    ``K`` output directions with respect to the layer output, ``(K, n, ...)``.
    Every quantity sums over both ``K`` and ``n``.

    A rule implements :meth:`per_example_grad`; :meth:`diag`,
    :meth:`flat_grads`, :meth:`write_grads` and :meth:`ekfac_diag` are derived from it and
    overridden where a contraction of ``x`` and ``gy`` is cheaper than
    per-example gradients. A rule with Kronecker structure sets ``kronecker``
    and implements :meth:`kfac_a` and :meth:`kfac_g` (``A`` from the inputs
    alone, ``G`` from the output gradients alone: a pass computes ``A`` once
    per batch however many directions it streams), or else overrides
    :meth:`kfac_factors`; its parameters are then ``weight`` of shape
    ``(groups * b, ...)`` and an optional ``bias`` of shape ``(groups * b,)``,
    seen per group as a ``(b, a)`` matrix whose last column is the bias.
    """

    #: Whether the rule has Kronecker factors.
    kronecker: ClassVar[bool] = False
    #: Whether the module maps every leading index of its input alike (a
    #: lookup, an affine map of the last axis), so that a call on an input
    #: shared by the whole batch (a positional embedding of ``arange(T)``) is
    #: the same call on that input repeated per example: the generator then
    #: expands its input and output over the batch (see :class:`LayerCapture`).
    broadcastable: ClassVar[bool] = False
    #: Whether per-example gradients are mostly zeros (an embedding's rows of
    #: the tokens an example does not hold): :meth:`add_grad` then touches few
    #: entries, so a sum of uses lets the others write first.
    sparse_grads: ClassVar[bool] = False

    def check(self, module: nn.Module) -> None:
        """Raise ``ValueError`` when ``module``'s configuration is not supported."""

    def prepare(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Transform a whole batch's layer input once, before any chunking.

        Every other method receives what this returns as ``x`` (the default:
        the input itself; normalisation layers return the normalised input).
        """
        return x

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-direction, per-example gradients of the module's parameters.

        Returns:
            Parameter name (as in ``module.named_parameters(recurse=False)``) ->
            tensor of shape ``(K, n, *param.shape)``.
        """
        raise NotImplementedError

    def _chunks(self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor):
        """Split the examples so that per-example gradients stay within budget."""
        per_example = gy.shape[0] * sum(
            p.numel() for p in module.parameters(recurse=False)
        )
        step = max(1, DEFAULT_CHUNK_ELEMENTS // max(per_example, 1))
        for start in range(0, x.shape[0], step):
            yield x[start : start + step], gy[:, start : start + step]

    def diag(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Sum over directions and examples of squared per-example gradients.

        Returns:
            Parameter name -> tensor of the parameter's shape.
        """
        out: dict[str, torch.Tensor] = {}
        for xc, gc in self._chunks(module, x, gy):
            for name, g in self.per_example_grad(module, xc, gc).items():
                sq = (g * g).sum((0, 1))
                out[name] = out[name] + sq if name in out else sq
        return out

    def add_diag(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        acc: dict[str, torch.Tensor],
        names: Collection[str] | None = None,
    ) -> None:
        """Add :meth:`diag` into ``acc`` (parameter name -> running sum), in place.

        ``names``: the module's parameters wanted, where not all of them (a
        weight tied to another layer's is summed there); None: all. A
        parameter missing from ``acc`` is added as a fresh tensor. Rules
        override this to accumulate straight into ``acc`` (one ``addmm_``
        instead of a product, a fresh result and a sum) and to skip the
        parameters not wanted: a fresh result per batch costs page faults on
        CPU once the allocator returns memory.
        """
        for name, d in self.diag(module, x, gy).items():
            if names is None or name in names:
                add_into(acc, name, d)

    def diag_input(self, module: nn.Module, x: torch.Tensor) -> Any:
        """Input-side work of :meth:`diag`, done once per batch for every direction.

        Where directions come one at a time, :meth:`diag` receives what this
        returns as ``x`` for each of them (the default: ``x`` itself; the
        convolution rule unfolds short patches once).
        """
        return x

    def flat_grads(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, names: list[str]
    ) -> torch.Tensor:
        """Per-example gradients of parameters ``names``, flattened and concatenated.

        Returns:
            Tensor of shape ``(K * n, sum of numel)``.
        """
        grads = self.per_example_grad(module, x, gy)
        rows = gy.shape[0] * x.shape[0]
        return torch.cat([grads[n].reshape(rows, -1) for n in names], 1)

    def outer_factors(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per-example gradients as single outer products, when they are.

        With ``(g, a, index)`` returned, the gradient of direction ``k`` and
        example ``i`` is ``outer(g[k, i], a[i])`` read in the order of
        ``index``: its flattened entry ``j`` is the flat parameter ``index[j]``
        (of parameters ``names``). Dense blocks then cost ``n p_l p_m``
        instead of ``K n p_l p_m`` (:mod:`nnfim.generator._dense`). The default:
        ``None``, no such structure.

        Returns:
            ``None``, or ``g`` ``(K, n, b)``, ``a`` ``(n, c)`` and ``index``
            ``(b * c,)`` (a permutation of the flat parameters).
        """
        return None

    def write_grads(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        names: list[str],
        out: torch.Tensor,
    ) -> None:
        """Write the rows of :meth:`flat_grads` into ``out`` without concatenating.

        Args:
            module: the layer.
            x: layer input ``(n, ...)``.
            gy: output gradients ``(K, n, ...)``.
            names: the parameters, in the order of their columns.
            out: destination of shape ``(K, n, sum of numel)``; it may be a
                strided view of a larger tensor (a slice of the columns).
        """
        grads = self.per_example_grad(module, x, gy)
        k, n = gy.shape[:2]
        start = 0
        for name in names:
            g = grads[name].reshape(k, n, -1)
            out[..., start : start + g.shape[-1]].copy_(g)
            start += g.shape[-1]

    def add_grad(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        name: str,
        out: torch.Tensor,
        overwrite: bool,
    ) -> None:
        """Write or add the per-example gradients of one parameter into ``out``.

        Used where one parameter sums several uses (tied weights): each use
        adds into the same rows, the first one writes them.

        Args:
            module: the layer.
            x: layer input ``(n, ...)``.
            gy: output gradients ``(K, n, ...)``.
            name: the parameter's name in ``module``.
            out: destination ``(K, n, *shape)``, possibly a strided view.
            overwrite: write (``out`` holds garbage) instead of adding.
        """
        write_or_add(out, self.per_example_grad(module, x, gy)[name], overwrite)

    def kfac_factors(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, convention: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kronecker factors summed over the examples of one batch.

        The default is ``(kfac_a(x), kfac_g(gy))``.

        Args:
            module: the layer.
            x: layer input ``(n, ...)``.
            gy: output gradients ``(K, n, ...)``.
            convention: ``"expand"`` (weight-sharing positions count as
                examples: ``A`` averages over them, ``G`` sums) or ``"reduce"``
                (inputs averaged and output gradients summed over positions
                first).

        Returns:
            ``(A, G)`` of shapes ``(groups, a, a)`` and ``(groups, b, b)``; the
            bias enters ``A`` as a constant input 1 (last row and column).
        """
        return (
            self.kfac_a(module, x, convention),
            self.kfac_g(module, gy, convention),
        )

    @property
    def kfac_split(self) -> bool:
        """Whether the factors are :meth:`kfac_a` and :meth:`kfac_g` (not overridden)."""
        return type(self).kfac_factors is LayerRule.kfac_factors

    def kfac_a(
        self, module: nn.Module, x: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """``A`` of :meth:`kfac_factors` from the layer input ``(n, ...)`` alone.

        Returns:
            ``(groups, a, a)``, summed over the examples.
        """
        raise NotImplementedError(f"{type(self).__name__} has no Kronecker factors")

    def kfac_g(
        self, module: nn.Module, gy: torch.Tensor, convention: str
    ) -> torch.Tensor:
        """``G`` of :meth:`kfac_factors` from the output gradients ``(K, n, ...)`` alone.

        Directions and examples enter alike: ``gy`` reshaped to ``(1, K * n, ...)``
        gives the same ``G``.

        Returns:
            ``(groups, b, b)``, summed over the directions and examples.
        """
        raise NotImplementedError(f"{type(self).__name__} has no Kronecker factors")

    def ekfac_diag(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        q_a: torch.Tensor,
        q_g: torch.Tensor,
    ) -> torch.Tensor:
        """Second moments of per-example gradients in a Kronecker eigenbasis.

        Args:
            module: the layer.
            x: layer input ``(n, ...)``.
            gy: output gradients ``(K, n, ...)``.
            q_a: eigenvectors of ``A``, ``(groups, a, a)``.
            q_g: eigenvectors of ``G``, ``(groups, b, b)``.

        Returns:
            ``sum_{k,i} (Q_G^T dW_ki Q_A)^2`` of shape ``(groups, b, a)``.
        """
        groups, b = q_g.shape[:2]
        total = torch.zeros(groups, b, q_a.shape[1], dtype=gy.dtype, device=gy.device)
        for xc, gc in self._chunks(module, x, gy):
            grads = self.per_example_grad(module, xc, gc)
            k, n = gc.shape[:2]
            parts = [grads["weight"].reshape(k, n, groups, b, -1)]
            if "bias" in grads:
                parts.append(grads["bias"].reshape(k, n, groups, b, 1))
            mat = torch.cat(parts, -1)
            rotated = torch.einsum("gbc,kngbd,gde->kngce", q_g, mat, q_a)
            total += (rotated * rotated).sum((0, 1))
        return total

    def gram(
        self,
        module: nn.Module,
        x1: torch.Tensor,
        gy1: torch.Tensor,
        x2: torch.Tensor,
        gy2: torch.Tensor,
        names: list[str],
    ) -> torch.Tensor:
        """Inner products of per-example gradients of two batches.

        Returns:
            ``(K1, n1, K2, n2)``: the layer's contribution to the Gram matrix.
        """
        r1 = self.flat_grads(module, x1, gy1, names)
        r2 = self.flat_grads(module, x2, gy2, names)
        # sizes from the gradients: a fallback layer's inputs are empty
        return (r1 @ r2.t()).reshape(*gy1.shape[:2], *gy2.shape[:2])

    def add_diag_with_cross(
        self,
        module: nn.Module,
        x_diag: Any,
        x: torch.Tensor,
        gy: torch.Tensor,
        acc: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """:meth:`add_diag` into ``acc``, and the :meth:`weight_bias_cross` terms.

        For a module with a weight and a bias (the quasi-diagonal's layers);
        ``x_diag`` is what :meth:`diag_input` returned for the input ``x``.
        Rules whose diagonal forms per-example weight gradients (convolutions)
        override this to form them once for both.

        Returns:
            The cross terms, a tensor of the weight's shape.
        """
        self.add_diag(module, x_diag, gy, acc)
        return self.weight_bias_cross(module, x, gy)

    def weight_bias_cross(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> torch.Tensor:
        """``sum_{k,i} dW_ki[o, ...] db_ki[o]``, the quasi-diagonal's cross terms.

        Returns:
            Tensor of the weight's shape.
        """
        total = None
        for xc, gc in self._chunks(module, x, gy):
            grads = self.per_example_grad(module, xc, gc)
            w, b = grads["weight"], grads["bias"]
            part = (w * b.reshape(*b.shape, *([1] * (w.dim() - 3)))).sum((0, 1))
            total = part if total is None else total + part
        assert total is not None
        return total


def register_rule(*module_types: type[nn.Module]) -> Callable[[R], R]:
    """Class decorator: use this rule for ``module_types`` and their subclasses.

    >>> class Scale(nn.Module):
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(d))
    ...     def forward(self, x):
    ...         return x * self.weight
    >>> @register_rule(Scale)
    ... class ScaleRule(LayerRule):
    ...     def per_example_grad(self, module, x, gy):
    ...         return {"weight": gy * x}
    >>> isinstance(find_rule(Scale(3)), ScaleRule)
    True
    """

    def decorate(cls: R) -> R:
        for t in module_types:
            _RULES[t] = cls()
        return cls

    return decorate


def find_rule(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``, looked up along its class's MRO (None if none)."""
    for klass in type(module).__mro__:
        if klass in _RULES:
            return _RULES[klass]
    return None


def registered_types() -> list[str]:
    """Names of the module types that have a rule, sorted."""
    return sorted(t.__name__ for t in _RULES)


def numel(module: nn.Module) -> int:
    """Number of parameters a module owns directly."""
    return sum(math.prod(p.shape) for p in module.parameters(recurse=False))


def bordered(
    core: torch.Tensor, total: torch.Tensor, count: int, bias: bool
) -> torch.Tensor:
    """``[[core, total], [total^T, count]]`` per group: the moment of ``[x; 1]``."""
    if not bias:
        return core
    groups, d = total.shape
    out = core.new_empty(groups, d + 1, d + 1)
    out[:, :d, :d] = core
    out[:, :d, d] = total
    out[:, d, :d] = total
    out[:, d, d] = count
    return out


def xtx(
    x: torch.Tensor, block: int = 160, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x^T x`` for ``x`` of shape ``(m, d)``, computing its upper blocks only.

    The products of column blocks ``i <= j`` are computed and the lower ones
    mirrored: about 60-75% of the multiply-adds of one matrix product, measured
    20-28% faster on CPU for ``d`` from 256 up (K-FAC's factors, dense
    Fishers); a plain product below ``1.5 block`` columns.

    Args:
        x: the rows, ``(m, d)``.
        block: target width of a column block.
        out: if given, ``(d, d)``: ``x^T x`` is added to it in place.

    Returns:
        ``x^T x`` (or ``out``), ``(d, d)``.
    """
    d = x.shape[1]
    nb = max(1, round(d / block))
    if nb == 1:
        return x.t() @ x if out is None else out.addmm_(x.t(), x)
    edges = [round(i * d / nb) for i in range(nb + 1)]
    if out is None:
        out = x.new_zeros(d, d)
    for i in range(nb):
        si = slice(edges[i], edges[i + 1])
        xi = x[:, si].t()
        out[si, si].addmm_(xi, x[:, si])
        for j in range(i + 1, nb):
            sj = slice(edges[j], edges[j + 1])
            blk = xi @ x[:, sj]
            out[si, sj] += blk
            out[sj, si] += blk.t()
    return out
