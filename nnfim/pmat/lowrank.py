"""The low-rank matrix ``F = U^T U`` kept as its factor."""

from __future__ import annotations

import torch

from nnfim.layers import LayerCollection
from nnfim.pmat._base import PMatAbstract, check_invertible, check_state
from nnfim.vector import PVector

__all__ = ["PMatLowRank"]


class PMatLowRank(PMatAbstract):
    r"""``F = s U^T U`` with a factor ``U`` of shape ``(m, P)``.

    Built by :func:`nnfim.FIM`, ``U`` holds the ``m = K n`` rows
    ``J_i^T d_ki / sqrt(n)``, so the matrix is the Fisher exactly; memory is
    ``m P``, cheap when there are fewer rows than parameters. ``mv`` is two
    products, ``solve`` uses the Woodbury identity
    ``(U^T U + r I)^{-1} = (I - U^T (r I + U U^T)^{-1} U) / r``, eigenpairs come
    from the ``(m, m)`` Gram matrix ``U U^T``; :meth:`truncate` keeps the top
    ``k`` eigen-directions.

    >>> lc = LayerCollection.from_model(torch.nn.Linear(2, 1))
    >>> m = PMatLowRank(lc, torch.tensor([[1.0, 0.0, 1.0]]))
    >>> m.trace(), m.eigvalsh()
    (tensor(2.), tensor([0., 0., 2.]))
    """

    def __init__(
        self,
        layer_collection: LayerCollection,
        factor: torch.Tensor,
        scale: float = 1.0,
    ) -> None:
        """Wrap ``factor`` of shape ``(m, P)``; the matrix is ``scale * U^T U``."""
        p = layer_collection.numel()
        if factor.dim() != 2 or factor.shape[1] != p:
            raise ValueError(
                f"PMatLowRank: factor has shape {tuple(factor.shape)}, the layer "
                f"collection needs (m, {p})."
            )
        self.layer_collection = layer_collection
        self.factor = factor
        self.scale = float(scale)

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the stored values."""
        return self.factor.dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored values."""
        return self.factor.device

    @property
    def rank(self) -> int:
        """Number of rows ``m`` of the factor (an upper bound of the rank)."""
        return self.factor.shape[0]

    def mv(self, v: PVector) -> PVector:
        """``s U^T (U v)``."""
        self._check_vector(v)
        return v.unflatten(self.scale * (self.factor.t() @ (self.factor @ v.flatten())))

    def dense(self) -> torch.Tensor:
        """The ``(P, P)`` dense tensor."""
        return self.scale * (self.factor.t() @ self.factor)

    def diag(self) -> torch.Tensor:
        """Column sums of squares of ``U``, shape ``(P,)``."""
        return self.scale * (self.factor * self.factor).sum(0)

    def trace(self) -> torch.Tensor:
        """``s ||U||_F^2``."""
        return self.scale * (self.factor * self.factor).sum()

    def gram(self) -> torch.Tensor:
        """The ``(m, m)`` Gram matrix ``s U U^T`` (same nonzero eigenvalues)."""
        return self.scale * (self.factor @ self.factor.t())

    def _tall(self) -> bool:
        """More rows than parameters: the ``(P, P)`` side is the smaller one."""
        return self.rank > self.layer_collection.numel()

    def _small(self) -> torch.Tensor:
        """``s U^T U`` or ``s U U^T``, whichever is smaller (same nonzero spectrum)."""
        return self.dense() if self._tall() else self.gram()

    def frobenius_norm(self) -> torch.Tensor:
        """``||s U U^T||_F``, on the smaller of the two Gram matrices."""
        return torch.linalg.matrix_norm(self._small())

    def _gram_eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.linalg.eigh(self.gram())

    def eigvalsh(self) -> torch.Tensor:
        """All ``P`` eigenvalues (``P - m`` of them zero when ``m < P``), ascending."""
        p = self.layer_collection.numel()
        if self._tall():
            return torch.linalg.eigvalsh(self.dense())
        values = self._gram_eigh()[0]
        values = values[torch.argsort(values.abs(), descending=True)[:p]]
        zeros = values.new_zeros(p - values.shape[0])
        return torch.sort(torch.cat([values, zeros])).values

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The nonzero part through the Gram matrix.

        Returns:
            Eigenvalues ``(r,)`` ascending and eigenvectors ``(P, r)`` for the
            ``r <= m`` nonzero eigenvalues; the other ``P - r`` are zero.
        """
        values, q = self._gram_eigh()
        keep = (
            values.abs()
            > values.abs().max() * torch.finfo(values.dtype).eps * self.rank
        )
        values, q = values[keep], q[:, keep]
        vectors = self.factor.t() @ q / (values.abs() / abs(self.scale)).sqrt()
        return values, vectors

    def truncate(self, k: int) -> PMatLowRank:
        """The best rank-``k`` approximation (top ``k`` eigenvalues in magnitude)."""
        values, q = self._gram_eigh()
        order = torch.argsort(values.abs(), descending=True)[:k]
        return PMatLowRank(
            self.layer_collection, q[:, order].t() @ self.factor, self.scale
        )

    def solve(
        self,
        v: PVector,
        regul: float = 0.0,
        *,
        method: str = "woodbury",
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> PVector:
        """Solve ``(M + regul I) x = v`` by the Woodbury identity.

        With more rows than parameters (``m > P``), the ``(P, P)`` system is
        solved directly instead: the smaller of the two.

        Raises:
            torch.linalg.LinAlgError: ``regul == 0`` and the matrix is singular
                (always when ``m < P``).
        """
        if method == "cg":
            return super().solve(v, regul, rtol=rtol, max_iter=max_iter)
        if method != "woodbury":
            raise ValueError(f"PMatLowRank.solve: unknown method {method!r}.")
        self._check_vector(v)
        check_invertible(self.eigvalsh(), regul, "PMatLowRank")
        b = v.flatten()
        if regul == 0 or self._tall():
            eye = torch.eye(b.shape[0], dtype=self.dtype, device=self.device)
            return v.unflatten(torch.linalg.solve(self.dense() + regul * eye, b))
        u = self.factor
        small = self.gram() + regul * torch.eye(
            self.rank, dtype=self.dtype, device=self.device
        )
        inner = torch.linalg.solve(small, u @ b)
        return v.unflatten((b - self.scale * (u.t() @ inner)) / regul)

    def _scale(self, alpha: float | torch.Tensor) -> PMatLowRank:
        return PMatLowRank(
            self.layer_collection, self.factor, self.scale * float(alpha)
        )

    # -- binary table hooks -------------------------------------------------
    @classmethod
    def _coerce(cls, m: PMatAbstract) -> PMatLowRank:
        assert isinstance(m, PMatLowRank)
        return m

    @classmethod
    def _combine(
        cls, op: str, lc: LayerCollection, a: PMatLowRank, b: PMatLowRank
    ) -> PMatLowRank:
        """``s U^T U + t V^T V``: one factor when both scales are positive."""
        assert op == "+"
        if a.scale <= 0 or b.scale <= 0:
            raise NotImplementedError(
                "PMatLowRank + PMatLowRank needs positive scales."
            )
        factor = torch.cat([a.factor * a.scale**0.5, b.factor * b.scale**0.5])
        return cls(lc, factor)

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            "factor": self.factor,
            "scale": torch.tensor(self.scale, dtype=self.dtype, device=self.device),
        }

    @classmethod
    def _from_state(
        cls, layer_collection: LayerCollection, state: dict[str, torch.Tensor]
    ) -> PMatLowRank:
        factor = state.get("factor")
        rows = (
            factor.shape[0] if isinstance(factor, torch.Tensor) and factor.dim() else 0
        )
        check_state(state, {"factor": (rows, layer_collection.numel()), "scale": ()})
        return cls(layer_collection, state["factor"], float(state["scale"]))
