"""Function-space matrices: the finite-width NTK Gram matrix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from nnfim.pmat._base import check_invertible
from nnfim.vector import FVector

__all__ = ["FMatDense"]


class FMatDense:
    """A dense Gram matrix over outputs and examples, shape ``(C, n, C2, n2)``.

    Built by :func:`nnfim.NTK` it is the neural tangent kernel
    ``K[c, i, d, j] = J_c(x_i) . J_d(x_j)``; a cross Gram between two sets of
    examples has ``n != n2`` and supports :meth:`mv` and :meth:`dense` only.
    The flat view :meth:`dense` is ``(C n, C2 n2)``, output-major like
    :meth:`FVector.flatten <nnfim.FVector.flatten>`.

    >>> k = FMatDense(torch.eye(4).reshape(2, 2, 2, 2))
    >>> k.trace(), k.mv(FVector(torch.ones(2, 2))).data
    (tensor(4.), tensor([[1., 1.],
            [1., 1.]]))
    """

    def __init__(self, data: torch.Tensor) -> None:
        """Wrap ``data`` of shape ``(C, n, C2, n2)``."""
        if data.dim() != 4:
            raise ValueError(
                f"FMatDense expects a tensor of shape (C, n, C2, n2), got {tuple(data.shape)}."
            )
        self.data = data

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(C, n, C2, n2)``."""
        c, n, c2, n2 = self.data.shape
        return c, n, c2, n2

    @property
    def dtype(self) -> torch.dtype:
        """Data type."""
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        """Device."""
        return self.data.device

    def dense(self) -> torch.Tensor:
        """Flat view ``(C n, C2 n2)``."""
        c, n, c2, n2 = self.shape
        return self.data.reshape(c * n, c2 * n2)

    def _square(self, what: str) -> torch.Tensor:
        flat = self.dense()
        if flat.shape[0] != flat.shape[1]:
            raise ValueError(
                f"FMatDense.{what} needs a square Gram matrix, got {self.shape}."
            )
        return flat

    def mv(self, v: FVector) -> FVector:
        """``K v`` for ``v`` of shape ``(C2, n2)``; returns ``(C, n)``."""
        if tuple(v.data.shape) != self.shape[2:]:
            raise ValueError(
                f"FMatDense.mv: vector of shape {tuple(v.data.shape)}, the matrix needs "
                f"{self.shape[2:]}."
            )
        return FVector(torch.einsum("cidj,dj->ci", self.data, v.data))

    def vTMv(self, v: FVector) -> torch.Tensor:
        """``v^T K v``, a 0-dim tensor."""
        return v.dot(self.mv(v))

    def trace(self) -> torch.Tensor:
        """Trace, a 0-dim tensor."""
        return torch.trace(self._square("trace"))

    def frobenius_norm(self) -> torch.Tensor:
        """Frobenius norm, a 0-dim tensor."""
        return torch.linalg.vector_norm(self.data)

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues of the flat view, ascending, ``(C n,)``."""
        return torch.linalg.eigvalsh(self._square("eigvalsh"))

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``(C n,)`` ascending and eigenvectors ``(C n, C n)``."""
        return torch.linalg.eigh(self._square("eigh"))

    def solve(self, v: FVector, regul: float = 0.0) -> FVector:
        """Solve ``(K + regul I) x = v`` (Cholesky; checked for singularity at 0).

        Raises:
            torch.linalg.LinAlgError: singular without ``regul``.
        """
        flat = self._square("solve")
        if tuple(v.data.shape) != self.shape[:2]:
            raise ValueError(
                f"FMatDense.solve: vector of shape {tuple(v.data.shape)}, expected "
                f"{self.shape[:2]}."
            )
        if regul == 0:
            check_invertible(torch.linalg.eigvalsh(flat), 0.0, "FMatDense")
        a = flat + regul * torch.eye(
            flat.shape[0], dtype=self.dtype, device=self.device
        )
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(
                "FMatDense.solve: the matrix is not positive definite; pass regul > 0."
            )
        x = torch.cholesky_solve(v.flatten()[:, None], chol)[:, 0]
        return FVector(x.reshape(self.shape[:2]))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FMatDense:
        """Move and/or cast, like ``Tensor.to``; returns a new matrix."""
        return FMatDense(self.data.to(device=device, dtype=dtype))

    def to_scipy(self) -> Any:
        """The flat view ``(C n, C2 n2)`` as a ``scipy.sparse.linalg.LinearOperator``.

        Products run in torch on the matrix's device and dtype; ``rmatvec`` is
        the transpose product, so a cross Gram (``n != n2``) works with
        ``scipy.sparse.linalg.svds`` and a square Gram with ``eigsh``.

        Raises:
            ImportError: scipy is not installed.
        """
        from nnfim._scipy import linear_operator

        flat = self.dense()
        rows, cols = flat.shape
        return linear_operator(
            (rows, cols),
            self.dtype,
            self.device,
            lambda x: flat @ x,
            lambda x: flat.t() @ x,
            lambda x: flat @ x,
            owner="FMatDense",
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: ``{"format": "nnfim.fmat", "data": (C, n, C2, n2)}``.

        Readable with ``torch.load(..., weights_only=True)``.
        """
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "data": self.data}

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> FMatDense:
        """A new matrix from :meth:`state_dict`'s output.

        Raises:
            ValueError: not what :meth:`state_dict` returns.
        """
        if (
            not isinstance(state_dict, Mapping)
            or state_dict.get("format") != _FORMAT
            or state_dict.get("version") != _FORMAT_VERSION
            or not isinstance(state_dict.get("data"), torch.Tensor)
        ):
            raise ValueError(
                f"not an FMatDense state dict: expected the keys format={_FORMAT!r}, "
                f"version={_FORMAT_VERSION} and a tensor 'data', as "
                "FMatDense.state_dict() returns."
            )
        return cls(state_dict["data"])

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the values in place (same shape required).

        Raises:
            ValueError: a malformed dict or another shape.
        """
        new = FMatDense.from_state_dict(state_dict)
        if new.data.shape != self.data.shape:
            raise ValueError(
                f"FMatDense.load_state_dict: the state dict has shape "
                f"{tuple(new.data.shape)}, this matrix {tuple(self.data.shape)}."
            )
        self.data = new.data

    def __repr__(self) -> str:
        return f"FMatDense(shape={self.shape}, dtype={self.dtype})"


_FORMAT = "nnfim.fmat"
_FORMAT_VERSION = 1
