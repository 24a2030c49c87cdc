"""The full ``(P, P)`` matrix."""

from __future__ import annotations

import torch

from nnfim.layers import LayerCollection
from nnfim.pmat._base import PMatAbstract, check_invertible, check_state
from nnfim.vector import PVector

__all__ = ["PMatDense"]


class PMatDense(PMatAbstract):
    """A dense ``(P, P)`` matrix: exact, memory ``P^2``.

    >>> lc = LayerCollection.from_model(torch.nn.Linear(2, 1))
    >>> m = PMatDense(lc, 2.0 * torch.eye(3))
    >>> m.solve(PVector.from_flat(lc, torch.ones(3))).flatten()
    tensor([0.5000, 0.5000, 0.5000])
    """

    def __init__(self, layer_collection: LayerCollection, data: torch.Tensor) -> None:
        """Wrap ``data`` of shape ``(P, P)`` in the flat order of ``layer_collection``."""
        p = layer_collection.numel()
        if tuple(data.shape) != (p, p):
            raise ValueError(
                f"PMatDense: data has shape {tuple(data.shape)}, the layer "
                f"collection needs ({p}, {p})."
            )
        self.layer_collection = layer_collection
        self.data = data

    @classmethod
    def from_pmat(cls, m: PMatAbstract) -> PMatDense:
        """Any matrix, materialised densely."""
        return cls(m.layer_collection, m.dense())

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
        return v.unflatten(self.data @ v.flatten())

    def vTMv(self, v: PVector) -> torch.Tensor:
        """Quadratic form ``v^T M v``, a 0-dim tensor."""
        self._check_vector(v)
        flat = v.flatten()
        return flat @ self.data @ flat

    def dense(self) -> torch.Tensor:
        """The stored ``(P, P)`` tensor."""
        return self.data

    def diag(self) -> torch.Tensor:
        """The diagonal, shape ``(P,)``."""
        return torch.diagonal(self.data)

    def frobenius_norm(self) -> torch.Tensor:
        """Frobenius norm, a 0-dim tensor."""
        return torch.linalg.matrix_norm(self.data)

    def _shifted(self, regul: float) -> torch.Tensor:
        if not regul:
            return self.data
        return self.data + regul * torch.eye(
            self.data.shape[0], dtype=self.dtype, device=self.device
        )

    def solve(
        self,
        v: PVector,
        regul: float = 0.0,
        *,
        method: str = "cholesky",
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> PVector:
        """Solve ``(M + regul I) x = v`` exactly.

        ``method="cholesky"`` (default) factorises once and falls back to LU for
        a matrix that is not positive definite (a difference of two Fishers);
        ``"cg"`` runs conjugate gradients. With ``regul == 0`` the spectrum is
        checked first, so a singular matrix raises instead of returning noise.

        Raises:
            torch.linalg.LinAlgError: the (shifted) matrix is singular.
        """
        if method == "cg":
            return super().solve(v, regul, rtol=rtol, max_iter=max_iter)
        if method != "cholesky":
            raise ValueError(f"PMatDense.solve: unknown method {method!r}.")
        self._check_vector(v)
        return v.unflatten(self._solve_flat(v.flatten()[:, None], regul)[:, 0])

    def _solve_flat(self, rhs: torch.Tensor, regul: float) -> torch.Tensor:
        if regul == 0:
            check_invertible(torch.linalg.svdvals(self.data), 0.0, "PMatDense")
        a = self._shifted(regul)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol)
        x, info = torch.linalg.solve_ex(a, rhs)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(
                "PMatDense.solve: the matrix is singular; pass regul > 0."
            )
        return x

    def inverse(self, regul: float = 0.0) -> PMatDense:
        """``(M + regul I)^{-1}`` as a dense matrix."""
        eye = torch.eye(self.data.shape[0], dtype=self.dtype, device=self.device)
        return PMatDense(self.layer_collection, self._solve_flat(eye, regul))

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues in ascending order, shape ``(P,)``."""
        return torch.linalg.eigvalsh(self.data)

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``(P,)`` ascending and eigenvectors as columns ``(P, P)``."""
        return torch.linalg.eigh(self.data)

    def _scale(self, alpha: float | torch.Tensor) -> PMatDense:
        return PMatDense(self.layer_collection, alpha * self.data)

    # -- binary table hooks -------------------------------------------------
    @classmethod
    def _coerce(cls, m: PMatAbstract) -> torch.Tensor:
        return m.dense()

    @classmethod
    def _combine(
        cls, op: str, lc: LayerCollection, a: torch.Tensor, b: torch.Tensor
    ) -> PMatDense:
        if op == "+":
            return cls(lc, a + b)
        if op == "-":
            return cls(lc, a - b)
        return cls(lc, a @ b)

    # -- storage ------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return {"data": self.data}

    @classmethod
    def _from_state(
        cls, layer_collection: LayerCollection, state: dict[str, torch.Tensor]
    ) -> PMatDense:
        p = layer_collection.numel()
        check_state(state, {"data": (p, p)})
        return cls(layer_collection, state["data"])
