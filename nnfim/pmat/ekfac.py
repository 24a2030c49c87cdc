"""Eigenvalue-corrected K-FAC (EKFAC)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nnfim.layers import LayerCollection
from nnfim.pmat._base import LayerwiseMixin, PMatAbstract, check_invertible
from nnfim.pmat._kron import from_matrix, scatter_block, split_layers, to_matrix
from nnfim.vector import PVector

__all__ = ["PMatEKFAC"]

Basis = tuple[torch.Tensor, torch.Tensor]


class PMatEKFAC(LayerwiseMixin, PMatAbstract):
    r"""EKFAC (George et al., 2018): the K-FAC eigenbasis with its own diagonal.

    Per Kronecker layer ``F_l ~ (Q_G kron Q_A) diag(S) (Q_G kron Q_A)^T``. Built
    by :func:`nnfim.FIM`, ``S`` starts as the K-FAC eigenvalues
    ``L_G kron L_A``; :meth:`update_diag` refits it to the exact second moment
    of per-example gradients projected on the basis, the best diagonal in that
    basis (in Frobenius norm). Layers without Kronecker structure are exact
    dense blocks. Every operation is exact in the basis: ``solve`` divides by
    ``S + regul``.

    >>> lc = LayerCollection.from_model(torch.nn.Linear(2, 1))
    >>> basis = {"": (torch.eye(3)[None], torch.eye(1)[None])}
    >>> PMatEKFAC(lc, basis, {"": torch.tensor([[[1.0, 2.0, 3.0]]])}).trace()
    tensor(6.)
    """

    #: ``load_state_dict`` keeps the link to the model (for ``update_diag``).
    _kept_on_load = ("generator",)

    def __init__(
        self,
        layer_collection: LayerCollection,
        bases: dict[str, Basis],
        diags: dict[str, torch.Tensor],
        blocks: dict[str, torch.Tensor] | None = None,
        *,
        generator: Any = None,
    ) -> None:
        """Wrap a basis, its diagonal and the dense blocks.

        Args:
            layer_collection: the parameters covered.
            bases: Kronecker layer name -> ``(Q_A, Q_G)`` orthogonal matrices of
                shapes ``(groups, a, a)`` and ``(groups, b, b)``.
            diags: Kronecker layer name -> scalings ``S`` of shape ``(groups, b, a)``.
            blocks: other layers: name -> exact ``(p_l, p_l)`` block.
            generator: the :class:`~nnfim.Generator` that :meth:`update_diag`
                reads by default (set by the builder; not stored by ``save``).
        """
        blocks = blocks or {}
        split_layers(layer_collection, bases, blocks)
        if set(diags) != set(bases):
            raise ValueError("PMatEKFAC: bases and diags must name the same layers.")
        for name, (qa, qg) in bases.items():
            expected = (qg.shape[0], qg.shape[1], qa.shape[1])
            if tuple(diags[name].shape) != expected:
                raise ValueError(
                    f"PMatEKFAC: diag of {name!r} has shape {tuple(diags[name].shape)}, "
                    f"the basis needs {expected}."
                )
        order = layer_collection.layer_names
        self.layer_collection = layer_collection
        self.bases = {n: bases[n] for n in order if n in bases}
        self.diags = {n: diags[n] for n in order if n in diags}
        self.blocks = {n: blocks[n] for n in order if n in blocks}
        self.generator = generator
        self._block_eig: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def from_kfac(cls, kfac: Any, generator: Any = None) -> PMatEKFAC:
        """The EKFAC of a :class:`~nnfim.PMatKFAC`, with ``S = L_G kron L_A``."""
        eig = kfac.eigendecomposition()
        bases, diags = {}, {}
        for name in kfac.factors:
            la, qa, lg, qg = eig[name]
            bases[name] = (qa, qg)
            diags[name] = lg[:, :, None] * la[:, None, :]
        return cls(
            kfac.layer_collection, bases, diags, dict(kfac.blocks), generator=generator
        )

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the stored values."""
        return next(iter(self._tensors())).dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored values."""
        return next(iter(self._tensors())).device

    def _tensors(self) -> list[torch.Tensor]:
        return list(self.diags.values()) + list(self.blocks.values())

    def update_diag(
        self, loader: Iterable[Any] | None = None, *, progress: bool | None = None
    ) -> PMatEKFAC:
        """Refit the scalings ``S`` to the exact Fisher in the basis, in place.

        ``S = (1/n) sum_i sum_k (Q_G^T dW_ik Q_A)^2`` over per-example gradients
        of the same variant and Fisher type as the build.

        Args:
            loader: the data (default: the loader the matrix was built from).
            progress: show a progress bar over the loader (default: as the
                build did).

        Returns:
            ``self``, for chaining.

        Raises:
            ValueError: the matrix was not built by :func:`nnfim.FIM` (loaded
                from a file): there is no model to read.
        """
        if self.generator is None:
            raise ValueError(
                "PMatEKFAC.update_diag needs the model: this matrix was not built by "
                "nnfim.FIM (loaded from a file?). Build it with FIM(..., "
                "representation=PMatEKFAC)."
            )
        gen = self.generator if loader is None else self.generator.with_loader(loader)
        if progress is not None and progress != gen.progress:
            gen = gen.with_loader(gen.loader)
            gen.progress = progress
        self.diags = gen.ekfac_diag(self.bases)
        return self

    # -- per-layer plumbing ---------------------------------------------------------
    def _block_eigh(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._block_eig is None:
            self._block_eig = {n: torch.linalg.eigh(b) for n, b in self.blocks.items()}
        return self._block_eig

    def _apply(
        self, flat: torch.Tensor, scales: dict[str, torch.Tensor], blocks
    ) -> torch.Tensor:
        lc, out = self.layer_collection, []
        for layer in lc:
            x = flat[lc.layer_slice(layer.name)]
            if layer.name in self.bases:
                qa, qg = self.bases[layer.name]
                m = to_matrix(layer, x, qa.shape[0])
                m = qg @ ((qg.mT @ m @ qa) * scales[layer.name]) @ qa.mT
                out.append(from_matrix(layer, m))
            else:
                out.append(blocks(layer.name, x))
        return torch.cat(out)

    def mv(self, v: PVector) -> PVector:
        """Matrix-vector product, rotated into the basis and back."""
        self._check_vector(v)
        return v.unflatten(
            self._apply(v.flatten(), self.diags, lambda n, x: self.blocks[n] @ x)
        )

    def _layer_dense(self, name: str) -> torch.Tensor:
        if name in self.blocks:
            return self.blocks[name]
        qa, qg = self.bases[name]
        s = self.diags[name]
        kron = []
        for i in range(qa.shape[0]):
            q = torch.kron(qg[i], qa[i])
            kron.append(q @ torch.diag(s[i].reshape(-1)) @ q.mT)
        return scatter_block(self.layer_collection[name], qa.shape[0], kron)

    def diag(self) -> torch.Tensor:
        """The diagonal ``(Q_G^2) S (Q_A^2)^T`` per layer, shape ``(P,)``."""
        out = []
        for layer in self.layer_collection:
            if layer.name in self.blocks:
                out.append(torch.diagonal(self.blocks[layer.name]))
            else:
                qa, qg = self.bases[layer.name]
                out.append(
                    from_matrix(
                        layer, (qg * qg) @ self.diags[layer.name] @ (qa * qa).mT
                    )
                )
        return torch.cat(out)

    def trace(self) -> torch.Tensor:
        """Sum of the scalings plus the traces of the blocks."""
        total = sum(
            (s.sum() for s in self.diags.values()),
            torch.zeros((), dtype=self.dtype, device=self.device),
        )
        return total + sum(
            (torch.trace(b) for b in self.blocks.values()), torch.zeros_like(total)
        )

    def frobenius_norm(self) -> torch.Tensor:
        """Norm of the scalings and the blocks together."""
        parts = [s.reshape(-1) for s in self.diags.values()] + [
            b.reshape(-1) for b in self.blocks.values()
        ]
        return torch.linalg.vector_norm(torch.cat(parts))

    def _eigenvalues(self) -> torch.Tensor:
        values = [s.reshape(-1) for s in self.diags.values()]
        values += [w for w, _ in self._block_eigh().values()]
        return torch.cat(values)

    def solve(
        self,
        v: PVector,
        regul: float = 0.0,
        *,
        method: str = "exact",
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> PVector:
        """Solve ``(M + regul I) x = v`` exactly in the eigenbasis (``"cg"`` also).

        Raises:
            torch.linalg.LinAlgError: singular without ``regul``.
        """
        if method == "cg":
            return super().solve(v, regul, rtol=rtol, max_iter=max_iter)
        if method != "exact":
            raise ValueError(f"PMatEKFAC.solve: unknown method {method!r}.")
        self._check_vector(v)
        inv = self._inverse_parts(regul)
        return v.unflatten(
            self._apply(v.flatten(), inv.diags, lambda n, x: inv.blocks[n] @ x)
        )

    def _inverse_parts(self, regul: float) -> PMatEKFAC:
        check_invertible(self._eigenvalues(), regul, "PMatEKFAC")
        eig = self._block_eigh()
        blocks = {
            n: q @ torch.diag(1.0 / (w + regul)) @ q.mT for n, (w, q) in eig.items()
        }
        return PMatEKFAC(
            self.layer_collection,
            self.bases,
            {n: 1.0 / (s + regul) for n, s in self.diags.items()},
            blocks,
        )

    def inverse(self, regul: float = 0.0) -> PMatEKFAC:
        """``(M + regul I)^{-1}``, exact, in the same basis."""
        return self._inverse_parts(regul)

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues (the scalings and the blocks'), ascending, ``(P,)``."""
        return torch.sort(self._eigenvalues()).values

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``(P,)`` ascending and eigenvectors as columns ``(P, P)``."""
        values, vectors = [], []
        eig = self._block_eigh()
        for layer in self.layer_collection:
            if layer.name in self.blocks:
                values.append(eig[layer.name][0])
                vectors.append(eig[layer.name][1])
                continue
            qa, qg = self.bases[layer.name]
            groups = qa.shape[0]
            values.append(from_matrix(layer, self.diags[layer.name]))
            vectors.append(
                scatter_block(
                    layer, groups, [torch.kron(qg[i], qa[i]) for i in range(groups)]
                )
            )
        all_values = torch.cat(values)
        order = torch.argsort(all_values)
        return all_values[order], torch.block_diag(*vectors)[:, order]

    def _scale(self, alpha: float | torch.Tensor) -> PMatEKFAC:
        return PMatEKFAC(
            self.layer_collection,
            self.bases,
            {n: alpha * s for n, s in self.diags.items()},
            {n: alpha * b for n, b in self.blocks.items()},
            generator=self.generator,
        )

    # -- storage ----------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, name in enumerate(self.layer_collection.layer_names):
            if name in self.bases:
                state[f"layer{i}.QA"], state[f"layer{i}.QG"] = self.bases[name]
                state[f"layer{i}.S"] = self.diags[name]
            else:
                state[f"layer{i}.block"] = self.blocks[name]
        return state

    @classmethod
    def _from_state(
        cls, layer_collection: LayerCollection, state: dict[str, torch.Tensor]
    ) -> PMatEKFAC:
        bases, diags, blocks = {}, {}, {}
        known = set()
        for i, name in enumerate(layer_collection.layer_names):
            if f"layer{i}.block" in state:
                blocks[name] = state[f"layer{i}.block"]
                known.add(f"layer{i}.block")
            else:
                bases[name] = (state[f"layer{i}.QA"], state[f"layer{i}.QG"])
                diags[name] = state[f"layer{i}.S"]
                known |= {f"layer{i}.QA", f"layer{i}.QG", f"layer{i}.S"}
        if set(state) != known:
            raise ValueError(f"unexpected tensors {sorted(set(state) - known)}")
        return cls(layer_collection, bases, diags, blocks)
