"""One dense block per layer."""

from __future__ import annotations

from typing import Any

import torch

from nnfim.layers import LayerCollection
from nnfim.pmat._base import PMatAbstract, check_invertible, check_state
from nnfim.vector import PVector

__all__ = ["PMatBlockDiag"]


class PMatBlockDiag(PMatAbstract):
    """Block-diagonal matrix, one dense ``(p_l, p_l)`` block per layer.

    As an approximation of a Fisher it keeps every term inside a layer and
    drops the cross-layer terms. Memory ``sum_l p_l^2``.

    >>> lc = LayerCollection.from_model(torch.nn.Linear(2, 1))
    >>> m = PMatBlockDiag(lc, {"": 2.0 * torch.eye(3)})
    >>> m.trace()
    tensor(6.)
    """

    def __init__(
        self, layer_collection: LayerCollection, blocks: dict[str, torch.Tensor]
    ) -> None:
        """Wrap ``blocks``: layer name -> tensor of shape ``(p_l, p_l)``."""
        expected = {
            layer.name: (layer.numel, layer.numel) for layer in layer_collection
        }
        try:
            check_state(blocks, expected)
        except ValueError as err:
            raise ValueError(f"PMatBlockDiag: {err}.") from err
        self.layer_collection = layer_collection
        self.blocks = {name: blocks[name] for name in expected}

    @classmethod
    def from_pmat(cls, m: PMatAbstract) -> PMatBlockDiag:
        """The per-layer blocks of any matrix (drops the cross-layer terms)."""
        return cls(m.layer_collection, m.layer_blocks())

    def layer_blocks(self) -> dict[str, torch.Tensor]:
        """Layer name -> the stored block."""
        return dict(self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the stored values."""
        return next(iter(self.blocks.values())).dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored values."""
        return next(iter(self.blocks.values())).device

    def _map(self, fn) -> dict[str, torch.Tensor]:
        return {name: fn(block) for name, block in self.blocks.items()}

    def _apply_flat(self, fn, flat: torch.Tensor) -> torch.Tensor:
        lc = self.layer_collection
        return torch.cat(
            [
                fn(block, flat[lc.layer_slice(name)])
                for name, block in self.blocks.items()
            ]
        )

    def mv(self, v: PVector) -> PVector:
        """Matrix-vector product ``M v``, block by block."""
        self._check_vector(v)
        return v.unflatten(self._apply_flat(torch.mv, v.flatten()))

    def dense(self) -> torch.Tensor:
        """The ``(P, P)`` dense tensor."""
        return torch.block_diag(*self.blocks.values())

    def diag(self) -> torch.Tensor:
        """The diagonal, shape ``(P,)``."""
        return torch.cat([torch.diagonal(b) for b in self.blocks.values()])

    def frobenius_norm(self) -> torch.Tensor:
        """Frobenius norm, a 0-dim tensor."""
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.matrix_norm(b) for b in self.blocks.values()])
        )

    def _eye(self, block: torch.Tensor) -> torch.Tensor:
        return torch.eye(block.shape[0], dtype=block.dtype, device=block.device)

    def _factors(self, regul: float) -> dict[str, torch.Tensor]:
        """Cholesky factors of the shifted blocks, after a singularity check at 0."""
        if regul == 0:
            check_invertible(
                torch.cat([torch.linalg.svdvals(b) for b in self.blocks.values()]),
                0.0,
                "PMatBlockDiag",
            )
        out = {}
        for name, block in self.blocks.items():
            chol, info = torch.linalg.cholesky_ex(block + regul * self._eye(block))
            if int(info) != 0:
                raise torch.linalg.LinAlgError(
                    f"PMatBlockDiag.solve: block {name!r} is not positive definite; "
                    "pass a larger regul."
                )
            out[name] = chol
        return out

    def solve(
        self,
        v: PVector,
        regul: float = 0.0,
        *,
        method: str = "cholesky",
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> PVector:
        """Solve ``(M + regul I) x = v`` exactly, one Cholesky factor per block.

        Raises:
            torch.linalg.LinAlgError: a block is singular or not positive definite.
        """
        if method == "cg":
            return super().solve(v, regul, rtol=rtol, max_iter=max_iter)
        self._check_vector(v)
        chols = self._factors(regul)
        flat, lc = v.flatten(), self.layer_collection
        out = torch.cat(
            [
                torch.cholesky_solve(flat[lc.layer_slice(name), None], chol)[:, 0]
                for name, chol in chols.items()
            ]
        )
        return v.unflatten(out)

    def inverse(self, regul: float = 0.0) -> PMatBlockDiag:
        """``(M + regul I)^{-1}``, block by block."""
        chols = self._factors(regul)
        return PMatBlockDiag(
            self.layer_collection,
            {name: torch.cholesky_inverse(chol) for name, chol in chols.items()},
        )

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues in ascending order, shape ``(P,)``."""
        return torch.sort(
            torch.cat([torch.linalg.eigvalsh(b) for b in self.blocks.values()])
        ).values

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``(P,)`` ascending and eigenvectors as columns ``(P, P)``."""
        pairs = [torch.linalg.eigh(b) for b in self.blocks.values()]
        values = torch.cat([w for w, _ in pairs])
        vectors = torch.block_diag(*[q for _, q in pairs])
        order = torch.argsort(values)
        return values[order], vectors[:, order]

    def _scale(self, alpha: float | torch.Tensor) -> PMatBlockDiag:
        return PMatBlockDiag(self.layer_collection, self._map(lambda b: alpha * b))

    # -- binary table hooks -------------------------------------------------
    @classmethod
    def _coerce(cls, m: PMatAbstract) -> dict[str, torch.Tensor]:
        return m.layer_blocks()

    @classmethod
    def _combine(
        cls,
        op: str,
        lc: LayerCollection,
        a: dict[str, torch.Tensor],
        b: dict[str, torch.Tensor],
    ) -> PMatBlockDiag:
        fn: Any = {"+": torch.add, "-": torch.sub, "@": torch.matmul}[op]
        return cls(lc, {name: fn(a[name], b[name]) for name in a})

    # -- storage ------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        # Layer names may be "" (root module) or contain dots: key by position.
        return {f"block{i}": b for i, b in enumerate(self.blocks.values())}

    @classmethod
    def _from_state(
        cls, layer_collection: LayerCollection, state: dict[str, torch.Tensor]
    ) -> PMatBlockDiag:
        layers = list(layer_collection)
        check_state(
            state,
            {f"block{i}": (layer.numel, layer.numel) for i, layer in enumerate(layers)},
        )
        return cls(
            layer_collection,
            {layer.name: state[f"block{i}"] for i, layer in enumerate(layers)},
        )
