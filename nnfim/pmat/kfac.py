"""Kronecker-factored approximate curvature (K-FAC)."""

from __future__ import annotations

import math
from typing import Any

import torch

from nnfim.layers import LayerCollection
from nnfim.linalg.cg import cg
from nnfim.pmat._base import LayerwiseMixin, PMatAbstract, check_invertible
from nnfim.pmat._kron import from_matrix, scatter_block, split_layers, to_matrix
from nnfim.vector import PVector

__all__ = ["PMatKFAC"]

Factors = tuple[torch.Tensor, torch.Tensor]

SOLVE_METHODS = ("exact", "factored", "cg")


class PMatKFAC(LayerwiseMixin, PMatAbstract):
    r"""K-FAC: per layer ``F_l ~ G_l kron A_l`` (Martens and Grosse, 2015).

    ``A`` is the second moment of the layer inputs (bias folded in as a
    constant 1), ``G`` that of the output gradients of all output directions;
    convolutions follow KFC (Grosse and Martens, 2016), one pair of factors per
    group. Layers without Kronecker structure (BatchNorm, ...) are held as
    exact dense blocks. Approximate: exact for one example, or a linear layer
    under a Gaussian likelihood; a block diagonal over layers in any case.

    ``solve`` is exact through the factors' eigendecompositions:
    ``(G kron A + r I)^{-1} = (Q_G kron Q_A) (L_G kron L_A + r)^{-1} (Q_G kron Q_A)^T``;
    ``method="factored"`` uses instead the factored damping heuristic of
    Martens and Grosse, ``(G + pi sqrt(r) I) kron (A + sqrt(r) / pi I)`` with
    ``pi = sqrt((tr A / dim A) / (tr G / dim G))``.

    A layer whose parameters several modules use with different Kronecker
    terms (a token embedding tied to the output head) is held as an exact sum
    ``sum_t G_t kron A_t`` (``terms``): ``mv``, ``diag``, ``trace``,
    ``frobenius_norm``, ``dense``, scaling, storage and the binary table are
    exact; ``solve`` runs conjugate gradients on that layer's block (to a
    relative residual of ``1e-10`` in float64, ``1e-6`` in float32, or
    ``rtol``); ``eigh``, ``eigvalsh``, ``pow``, ``inverse`` and EKFAC raise
    (use :func:`nnfim.linalg.lanczos` for its spectrum).

    >>> lc = LayerCollection.from_model(torch.nn.Linear(2, 1))
    >>> a, g = torch.eye(3)[None], 2.0 * torch.eye(1)[None]
    >>> PMatKFAC(lc, {"": (a, g)}).trace()
    tensor(6.)
    """

    def __init__(
        self,
        layer_collection: LayerCollection,
        factors: dict[str, Factors],
        blocks: dict[str, torch.Tensor] | None = None,
        terms: dict[str, list[Factors]] | None = None,
    ) -> None:
        """Wrap factors, blocks and sums of Kronecker terms.

        Args:
            layer_collection: the parameters covered.
            factors: Kronecker layer name -> ``(A, G)`` of shapes
                ``(groups, a, a)`` and ``(groups, b, b)``.
            blocks: other layers: name -> exact ``(p_l, p_l)`` block.
            terms: layers held as ``sum_t G_t kron A_t``: name -> list of
                ``(A_t, G_t)`` (one term is the same as ``factors``).
        """
        blocks = blocks or {}
        factors = dict(factors)
        sums: dict[str, list[Factors]] = {}
        for name, pairs in (terms or {}).items():
            if not pairs:
                raise ValueError(f"PMatKFAC: no Kronecker terms for {name!r}.")
            if name in factors:
                raise ValueError(f"PMatKFAC: {name!r} is in both factors and terms.")
            if len(pairs) == 1:
                factors[name] = (pairs[0][0], pairs[0][1])
            else:
                sums[name] = [(a, g) for a, g in pairs]
        split_layers(layer_collection, {**factors, **sums}, blocks)
        checked = list(factors.items())
        checked += [(n, ag) for n, pairs in sums.items() for ag in pairs]
        for name, (a, g) in checked:
            entry = layer_collection[name]
            groups = a.shape[0]
            if a.dim() != 3 or g.dim() != 3 or g.shape[0] != groups:
                raise ValueError(
                    f"PMatKFAC: factors of {name!r} must be (groups, n, n)."
                )
            if groups * a.shape[1] * g.shape[1] != entry.numel:
                raise ValueError(
                    f"PMatKFAC: factors of {name!r} have {groups} x {g.shape[1]} x "
                    f"{a.shape[1]} entries, the layer has {entry.numel} parameters."
                )
        self.layer_collection = layer_collection
        self.factors = {
            n: factors[n] for n in layer_collection.layer_names if n in factors
        }
        self.blocks = {
            n: blocks[n] for n in layer_collection.layer_names if n in blocks
        }
        #: layers held as sums of Kronecker terms: name -> [(A_t, G_t), ...]
        self.terms = {n: sums[n] for n in layer_collection.layer_names if n in sums}
        for name, pairs in self.terms.items():
            if len({(a.shape, g.shape) for a, g in pairs}) != 1:
                raise ValueError(
                    f"PMatKFAC: the Kronecker terms of {name!r} differ in shape."
                )
        self._eig: dict[str, tuple[torch.Tensor, ...]] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the stored values."""
        return next(iter(self._tensors())).dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored values."""
        return next(iter(self._tensors())).device

    def _tensors(self) -> list[torch.Tensor]:
        pairs = [*self.factors.values()]
        pairs += [ag for ts in self.terms.values() for ag in ts]
        return [t for pair in pairs for t in pair] + list(self.blocks.values())

    def _pairs(self, name: str) -> list[Factors]:
        """The Kronecker terms of a layer (one for a plain K-FAC layer)."""
        return self.terms[name] if name in self.terms else [self.factors[name]]

    def _kron_names(self) -> list[str]:
        return [n for n in self.layer_collection.layer_names if n not in self.blocks]

    def _refuse_terms(self, what: str) -> None:
        if self.terms:
            raise ValueError(
                f"PMatKFAC.{what}: layers {list(self.terms)} are sums of Kronecker "
                "terms (tied weights), which have no Kronecker eigendecomposition; "
                "use solve (conjugate gradients on those blocks), "
                "nnfim.linalg.lanczos for their spectrum, or leave them out with "
                "layer_collection=."
            )

    # -- per-layer plumbing ---------------------------------------------------
    def _per_layer(self, flat: torch.Tensor, kron, dense) -> torch.Tensor:
        """Apply ``kron(name, V)`` or ``dense(name, x)`` layer by layer."""
        lc, out = self.layer_collection, []
        for layer in lc:
            x = flat[lc.layer_slice(layer.name)]
            if layer.name not in self.blocks:
                groups = self._pairs(layer.name)[0][0].shape[0]
                out.append(
                    from_matrix(layer, kron(layer.name, to_matrix(layer, x, groups)))
                )
            else:
                out.append(dense(layer.name, x))
        return torch.cat(out)

    def eigendecomposition(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per layer ``(L_A, Q_A, L_G, Q_G)`` or, for dense blocks, ``(L, Q)`` (cached).

        Raises:
            ValueError: a layer is a sum of Kronecker terms.
        """
        self._refuse_terms("eigendecomposition")
        if self._eig is None:
            eig: dict[str, tuple[torch.Tensor, ...]] = {}
            for name, (a, g) in self.factors.items():
                la, qa = torch.linalg.eigh(a)
                lg, qg = torch.linalg.eigh(g)
                eig[name] = (la, qa, lg, qg)
            for name, block in self.blocks.items():
                eig[name] = tuple(torch.linalg.eigh(block))
            self._eig = eig
        return self._eig

    # -- required -------------------------------------------------------------
    def mv(self, v: PVector) -> PVector:
        """Matrix-vector product: ``G V A`` per Kronecker layer, ``B x`` per block."""
        self._check_vector(v)
        out = self._per_layer(
            v.flatten(), self._kron_mv, lambda n, x: self.blocks[n] @ x
        )
        return v.unflatten(out)

    def _kron_mv(self, name: str, m: torch.Tensor) -> torch.Tensor:
        """``sum_t G_t V A_t`` for per-group matrices ``V`` ``(groups, b, a)``."""
        out = None
        for a, g in self._pairs(name):
            part = g @ m @ a
            out = part if out is None else out + part
        assert out is not None
        return out

    def _layer_dense(self, name: str) -> torch.Tensor:
        if name in self.blocks:
            return self.blocks[name]
        pairs = self._pairs(name)
        groups = pairs[0][0].shape[0]
        kron = []
        for i in range(groups):
            block = torch.kron(pairs[0][1][i], pairs[0][0][i])
            for a, g in pairs[1:]:
                block = block + torch.kron(g[i], a[i])
            kron.append(block)
        return scatter_block(self.layer_collection[name], groups, kron)

    def diag(self) -> torch.Tensor:
        """The diagonal: per layer the Kronecker product of the factor diagonals, ``(P,)``."""
        out = []
        for layer in self.layer_collection:
            if layer.name in self.blocks:
                out.append(torch.diagonal(self.blocks[layer.name]))
            else:
                d = torch.stack(
                    [
                        torch.diagonal(g, dim1=1, dim2=2)[:, :, None]
                        * torch.diagonal(a, dim1=1, dim2=2)[:, None, :]
                        for a, g in self._pairs(layer.name)
                    ]
                ).sum(0)
                out.append(from_matrix(layer, d))
        return torch.cat(out)

    # -- cheaper than the defaults ------------------------------------------------
    def trace(self) -> torch.Tensor:
        """``sum_l tr(G_l) tr(A_l)`` plus the traces of the blocks."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for name in self._kron_names():
            for a, g in self._pairs(name):
                total = (
                    total
                    + (
                        torch.diagonal(a, dim1=1, dim2=2).sum(1)
                        * torch.diagonal(g, dim1=1, dim2=2).sum(1)
                    ).sum()
                )
        for block in self.blocks.values():
            total = total + torch.trace(block)
        return total

    def frobenius_norm(self) -> torch.Tensor:
        """``sqrt(sum_l ||G_l||^2 ||A_l||^2)`` plus the blocks.

        A sum of terms: ``||sum_t G_t kron A_t||^2 = sum_{t,s} <G_t, G_s> <A_t, A_s>``.
        """
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for name in self._kron_names():
            pairs = self._pairs(name)
            for a, g in pairs:
                for a2, g2 in pairs:
                    total = total + ((a * a2).sum((1, 2)) * (g * g2).sum((1, 2))).sum()
        for block in self.blocks.values():
            total = total + torch.linalg.matrix_norm(block) ** 2
        return total.sqrt()

    def _damped_eigenvalues(self, regul: float, method: str) -> dict[str, torch.Tensor]:
        """Per layer the eigenvalues of the damped matrix, in the eigenbasis layout."""
        out = {}
        for name, e in self.eigendecomposition().items():
            if name in self.blocks:
                out[name] = e[0] + regul
                continue
            la, _, lg, _ = e
            if method == "factored" and regul > 0:
                a, g = self.factors[name]
                pi = _pi(a, g)
                root = math.sqrt(regul)
                out[name] = (lg + pi * root)[:, :, None] * (la + root / pi)[:, None, :]
            else:
                out[name] = lg[:, :, None] * la[:, None, :] + regul
        return out

    def _apply_in_eigenbasis(
        self, flat: torch.Tensor, scales: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        eig = self.eigendecomposition()

        def kron(n: str, m: torch.Tensor) -> torch.Tensor:
            _, qa, _, qg = eig[n]
            return qg @ ((qg.mT @ m @ qa) * scales[n]) @ qa.mT

        def dense(n: str, x: torch.Tensor) -> torch.Tensor:
            q = eig[n][1]
            return q @ ((q.mT @ x) * scales[n])

        return self._per_layer(flat, kron, dense)

    def solve(
        self,
        v: PVector,
        regul: float = 0.0,
        *,
        method: str = "exact",
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> PVector:
        """Solve ``(M + regul I) x = v`` through the factors' eigendecompositions.

        Args:
            v: right-hand side.
            regul: damping; ``0`` fails on a singular matrix.
            method: ``"exact"`` (default), ``"factored"`` (the factored damping
                heuristic: solves a different, Kronecker-shaped damped matrix)
                or ``"cg"``.
            rtol: CG tolerance (``method="cg"``).
            max_iter: CG iteration cap (``method="cg"``).

        Raises:
            torch.linalg.LinAlgError: singular without ``regul``.
        """
        if method == "cg":
            return super().solve(v, regul, rtol=rtol, max_iter=max_iter)
        if method not in SOLVE_METHODS:
            raise ValueError(
                f"PMatKFAC.solve: unknown method {method!r}; use one of {SOLVE_METHODS}."
            )
        self._check_vector(v)
        if self.terms:
            return self._solve_with_terms(v, regul, method, rtol, max_iter)
        damped = self._damped_eigenvalues(regul, method)
        check_invertible(
            torch.cat([d.reshape(-1) for d in damped.values()]), 0.0, "PMatKFAC"
        )
        inverse = {n: 1.0 / d for n, d in damped.items()}
        return v.unflatten(self._apply_in_eigenbasis(v.flatten(), inverse))

    def _solve_with_terms(
        self,
        v: PVector,
        regul: float,
        method: str,
        rtol: float | None,
        max_iter: int | None,
    ) -> PVector:
        """Per layer: eigenbases for one term and blocks, CG for sums of terms."""
        lc, flat = self.layer_collection, v.flatten()
        out = torch.empty_like(flat)
        rest = [n for n in lc.layer_names if n not in self.terms]
        if rest:
            sub = lc.subset(names=rest)
            plain = PMatKFAC(sub, self.factors, self.blocks)
            x = torch.cat([flat[lc.layer_slice(n)] for n in rest])
            y = plain.solve(PVector.from_flat(sub, x), regul, method=method).flatten()
            for n in rest:
                out[lc.layer_slice(n)] = y[sub.layer_slice(n)]
        for name in self.terms:
            layer = lc[name]
            groups = self.terms[name][0][0].shape[0]

            def op(
                x: torch.Tensor,
                layer: Any = layer,
                name: str = name,
                groups: int = groups,
            ) -> torch.Tensor:
                y = from_matrix(layer, self._kron_mv(name, to_matrix(layer, x, groups)))
                return y + regul * x if regul else y

            out[lc.layer_slice(name)] = cg(
                op,
                flat[lc.layer_slice(name)],
                rtol=rtol,
                max_iter=max_iter,
                name=f"PMatKFAC (layer {name!r}, a sum of Kronecker terms)",
            )
        return v.unflatten(out)

    def inverse(self, regul: float = 0.0, *, method: str = "exact") -> PMatAbstract:
        """``(M + regul I)^{-1}``.

        A Kronecker product stays one when ``regul == 0`` or with
        ``method="factored"`` (a :class:`PMatKFAC` is returned); with exact
        damping the inverse is diagonal in the Kronecker eigenbasis, returned as
        a :class:`~nnfim.PMatEKFAC`.

        Raises:
            ValueError: a layer is a sum of Kronecker terms.
        """
        self._refuse_terms("inverse")
        if regul > 0 and method == "exact":
            from nnfim.pmat.ekfac import PMatEKFAC

            eig = self.eigendecomposition()
            damped = self._damped_eigenvalues(regul, method)
            check_invertible(
                torch.cat([d.reshape(-1) for d in damped.values()]), 0.0, "PMatKFAC"
            )
            bases = {n: (eig[n][1], eig[n][3]) for n in self.factors}
            diags = {n: 1.0 / damped[n] for n in self.factors}
            blocks = {
                n: eig[n][1] @ torch.diag(1.0 / damped[n]) @ eig[n][1].mT
                for n in self.blocks
            }
            return PMatEKFAC(self.layer_collection, bases, diags, blocks)
        self._check_method(method)
        return self._factor_power(-1.0, regul, method)

    def pow(
        self, exponent: float, *, regul: float = 0.0, method: str = "factored"
    ) -> PMatKFAC:
        """``(G + d_G) ^ x kron (A + d_A) ^ x`` per layer (blocks: ``(B + r I)^x``).

        With ``regul > 0`` the damping is split between the factors as in the
        factored heuristic (``method="factored"``); eigenvalues are clipped
        at zero before a fractional power.

        Raises:
            torch.linalg.LinAlgError: a negative power of a singular factor.
            ValueError: a layer is a sum of Kronecker terms.
        """
        self._refuse_terms("pow")
        self._check_method(method)
        return self._factor_power(exponent, regul, method)

    def _check_method(self, method: str) -> None:
        if method not in ("exact", "factored"):
            raise ValueError(
                f"PMatKFAC: unknown method {method!r}; use 'exact' or 'factored'."
            )

    def _factor_power(self, exponent: float, regul: float, method: str) -> PMatKFAC:
        eig = self.eigendecomposition()

        def power(
            values: torch.Tensor, vectors: torch.Tensor, shift: float
        ) -> torch.Tensor:
            values = values + shift
            if exponent < 0:
                check_invertible(values, 0.0, "PMatKFAC")
            if exponent != int(exponent):
                values = values.clamp_min(0)
            return vectors @ torch.diag_embed(values**exponent) @ vectors.mT

        factors = {}
        for name, (a, g) in self.factors.items():
            la, qa, lg, qg = eig[name]
            if regul > 0 and method == "exact":
                raise ValueError(
                    "PMatKFAC: exact damping does not keep the Kronecker form; use "
                    "method='factored', or inverse(regul) for the exact inverse."
                )
            pi = _pi(a, g) if regul > 0 else 1.0
            root = math.sqrt(regul)
            factors[name] = (power(la, qa, root / pi), power(lg, qg, root * pi))
        blocks = {n: power(eig[n][0], eig[n][1], regul) for n in self.blocks}
        return PMatKFAC(self.layer_collection, factors, blocks)

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues ``L_G kron L_A`` (and the blocks'), ascending, ``(P,)``.

        Raises:
            ValueError: a layer is a sum of Kronecker terms.
        """
        self._refuse_terms("eigvalsh")
        return torch.sort(
            torch.cat(
                [d.reshape(-1) for d in self._damped_eigenvalues(0.0, "exact").values()]
            )
        ).values

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kronecker eigenpairs: values ``(P,)`` ascending, vectors ``(P, P)``.

        Raises:
            ValueError: a layer is a sum of Kronecker terms.
        """
        eig = self.eigendecomposition()
        values, vectors = [], []
        for layer in self.layer_collection:
            e = eig[layer.name]
            if layer.name in self.blocks:
                values.append(e[0])
                vectors.append(e[1])
                continue
            la, qa, lg, qg = e
            groups = la.shape[0]
            values.append(from_matrix(layer, lg[:, :, None] * la[:, None, :]))
            kron = [torch.kron(qg[i], qa[i]) for i in range(groups)]
            vec = scatter_block(layer, groups, kron)
            # columns in Kronecker order -> columns in flat order
            vectors.append(vec)
        all_values = torch.cat(values)
        all_vectors = torch.block_diag(*vectors)
        order = torch.argsort(all_values)
        return all_values[order], all_vectors[:, order]

    def _scale(self, alpha: float | torch.Tensor) -> PMatKFAC:
        return PMatKFAC(
            self.layer_collection,
            {n: (a, alpha * g) for n, (a, g) in self.factors.items()},
            {n: alpha * b for n, b in self.blocks.items()},
            {n: [(a, alpha * g) for a, g in ts] for n, ts in self.terms.items()},
        )

    # -- storage ---------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, name in enumerate(self.layer_collection.layer_names):
            if name in self.factors:
                state[f"layer{i}.A"], state[f"layer{i}.G"] = self.factors[name]
            elif name in self.terms:
                for j, (a, g) in enumerate(self.terms[name]):
                    state[f"layer{i}.term{j}.A"], state[f"layer{i}.term{j}.G"] = a, g
            else:
                state[f"layer{i}.block"] = self.blocks[name]
        return state

    @classmethod
    def _from_state(
        cls, layer_collection: LayerCollection, state: dict[str, torch.Tensor]
    ) -> PMatKFAC:
        factors, blocks, terms = {}, {}, {}
        known = set()
        for i, name in enumerate(layer_collection.layer_names):
            if f"layer{i}.block" in state:
                blocks[name] = state[f"layer{i}.block"]
                known.add(f"layer{i}.block")
            elif f"layer{i}.term0.A" in state:
                pairs, j = [], 0
                while f"layer{i}.term{j}.A" in state:
                    keys = (f"layer{i}.term{j}.A", f"layer{i}.term{j}.G")
                    pairs.append((state[keys[0]], state[keys[1]]))
                    known |= set(keys)
                    j += 1
                terms[name] = pairs
            else:
                factors[name] = (state[f"layer{i}.A"], state[f"layer{i}.G"])
                known |= {f"layer{i}.A", f"layer{i}.G"}
        if set(state) != known:
            raise ValueError(f"unexpected tensors {sorted(set(state) - known)}")
        return cls(layer_collection, factors, blocks, terms)


def _pi(a: torch.Tensor, g: torch.Tensor) -> float:
    """Factored-damping split ``sqrt((tr A / dim A) / (tr G / dim G))``."""
    ta = torch.diagonal(a, dim1=1, dim2=2).mean()
    tg = torch.diagonal(g, dim1=1, dim2=2).mean()
    if float(ta) <= 0 or float(tg) <= 0:
        return 1.0
    return float(torch.sqrt(ta / tg))
