"""The diagonal matrix."""

from __future__ import annotations

import torch

from nnfim.layers import LayerCollection
from nnfim.pmat._base import PMatAbstract, check_invertible, check_state
from nnfim.vector import PVector

__all__ = ["PMatDiag"]


class PMatDiag(PMatAbstract):
    """A diagonal matrix: memory ``P``, every operation exact and ``O(P)``.

    As an approximation of a Fisher it keeps the exact diagonal and drops every
    off-diagonal term.

    >>> lc = LayerCollection.from_model(torch.nn.Linear(2, 1))
    >>> m = PMatDiag(lc, torch.tensor([1.0, 2.0, 4.0]))
    >>> m.trace(), m.solve(PVector.from_flat(lc, torch.ones(3))).flatten()
    (tensor(7.), tensor([1.0000, 0.5000, 0.2500]))
    """

    def __init__(self, layer_collection: LayerCollection, diag: torch.Tensor) -> None:
        """Wrap the diagonal, a tensor of shape ``(P,)`` in flat parameter order."""
        p = layer_collection.numel()
        if tuple(diag.shape) != (p,):
            raise ValueError(
                f"PMatDiag: diag has shape {tuple(diag.shape)}, the layer collection "
                f"needs ({p},)."
            )
        self.layer_collection = layer_collection
        self.data = diag

    @classmethod
    def from_pmat(cls, m: PMatAbstract) -> PMatDiag:
        """The diagonal of any matrix (drops every off-diagonal term)."""
        return cls(m.layer_collection, m.diag())

    def layer_blocks(self) -> dict[str, torch.Tensor]:
        """Layer name -> diagonal ``(p_l, p_l)`` block."""
        lc = self.layer_collection
        return {n: torch.diag(self.data[lc.layer_slice(n)]) for n in lc.layer_names}

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the stored values."""
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored values."""
        return self.data.device

    def mv(self, v: PVector) -> PVector:
        """Matrix-vector product ``M v``."""
        self._check_vector(v)
        return v.unflatten(self.data * v.flatten())

    def vTMv(self, v: PVector) -> torch.Tensor:
        """Quadratic form ``v^T M v``, a 0-dim tensor."""
        self._check_vector(v)
        flat = v.flatten()
        return torch.dot(self.data * flat, flat)

    def dense(self) -> torch.Tensor:
        """The ``(P, P)`` dense tensor."""
        return torch.diag(self.data)

    def diag(self) -> torch.Tensor:
        """The stored diagonal, shape ``(P,)``."""
        return self.data

    def frobenius_norm(self) -> torch.Tensor:
        """Frobenius norm, a 0-dim tensor."""
        return torch.linalg.vector_norm(self.data)

    def solve(
        self,
        v: PVector,
        regul: float = 0.0,
        *,
        method: str = "exact",
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> PVector:
        """Solve ``(M + regul I) x = v`` exactly (an elementwise division).

        Raises:
            torch.linalg.LinAlgError: an entry of ``M + regul I`` is zero at
                working precision.
        """
        if method == "cg":
            return super().solve(v, regul, rtol=rtol, max_iter=max_iter)
        self._check_vector(v)
        check_invertible(self.data, regul, "PMatDiag")
        return v.unflatten(v.flatten() / (self.data + regul))

    def inverse(self, regul: float = 0.0) -> PMatDiag:
        """``(M + regul I)^{-1}`` as a diagonal matrix."""
        check_invertible(self.data, regul, "PMatDiag")
        return PMatDiag(self.layer_collection, 1.0 / (self.data + regul))

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues in ascending order, shape ``(P,)``."""
        return torch.sort(self.data).values

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``(P,)`` ascending and eigenvectors (permuted identity, ``(P, P)``)."""
        values, order = torch.sort(self.data)
        eye = torch.eye(self.data.shape[0], dtype=self.dtype, device=self.device)
        return values, eye[:, order]

    def _scale(self, alpha: float | torch.Tensor) -> PMatDiag:
        return PMatDiag(self.layer_collection, alpha * self.data)

    # -- binary table hooks -------------------------------------------------
    @classmethod
    def _coerce(cls, m: PMatAbstract) -> torch.Tensor:
        if not isinstance(m, PMatDiag):
            raise TypeError(f"a {type(m).__name__} is not diagonal")
        return m.data

    @classmethod
    def _combine(
        cls, op: str, lc: LayerCollection, a: torch.Tensor, b: torch.Tensor
    ) -> PMatDiag:
        if op == "+":
            return cls(lc, a + b)
        if op == "-":
            return cls(lc, a - b)
        return cls(lc, a * b)

    # -- storage ------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return {"diag": self.data}

    @classmethod
    def _from_state(
        cls, layer_collection: LayerCollection, state: dict[str, torch.Tensor]
    ) -> PMatDiag:
        check_state(state, {"diag": (layer_collection.numel(),)})
        return cls(layer_collection, state["diag"])
