"""A matrix known only through its products with vectors."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from nnfim.layers import LayerCollection
from nnfim.pmat._base import PMatAbstract
from nnfim.vector import PVector

__all__ = ["PMatImplicit"]


class PMatImplicit(PMatAbstract):
    """A matrix-free matrix: nothing of size ``P^2`` is stored.

    Built by :func:`nnfim.FIM` with ``representation=PMatImplicit``, each
    :meth:`mv` is one pass over the data (a forward with Jacobian-vector
    products, then one backward per batch). :meth:`solve` runs conjugate
    gradients on :meth:`mv`. :meth:`diag` and :meth:`dense` use the functions
    given at construction when there are some (the builder gives exact ones),
    else probe :meth:`mv` with the ``P`` basis vectors.

    >>> lc = LayerCollection.from_model(torch.nn.Linear(2, 1))
    >>> m = PMatImplicit(lc, lambda v: 2.0 * v, dtype=torch.float32)
    >>> m.vTMv(PVector.from_flat(lc, torch.ones(3)))
    tensor(6.)
    """

    storable: ClassVar[bool] = False

    def __init__(
        self,
        layer_collection: LayerCollection,
        mv: Callable[[PVector], PVector],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        diag: Callable[[], torch.Tensor] | None = None,
        dense: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        """Wrap a product function.

        Args:
            layer_collection: the parameters the matrix covers.
            mv: ``v -> M v`` on :class:`~nnfim.PVector`.
            dtype: data type of the products.
            device: device of the products.
            diag: optional ``() -> (P,)`` exact diagonal.
            dense: optional ``() -> (P, P)`` exact dense matrix.
        """
        self.layer_collection = layer_collection
        self._mv = mv
        self._dtype = dtype
        self._device = torch.device(device)
        self._diag_fn = diag
        self._dense_fn = dense

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the products."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the products."""
        return self._device

    def mv(self, v: PVector) -> PVector:
        """Matrix-vector product ``M v``."""
        self._check_vector(v)
        return self._mv(v)

    def _probe(self) -> torch.Tensor:
        p = self.layer_collection.numel()
        eye = torch.eye(p, dtype=self.dtype, device=self.device)
        lc = self.layer_collection
        return torch.stack(
            [self._mv(PVector.from_flat(lc, eye[i])).flatten() for i in range(p)], 1
        )

    def dense(self) -> torch.Tensor:
        """The ``(P, P)`` dense tensor (materialised on request)."""
        return self._dense_fn() if self._dense_fn is not None else self._probe()

    def diag(self) -> torch.Tensor:
        """The diagonal, shape ``(P,)``."""
        if self._diag_fn is not None:
            return self._diag_fn()
        return torch.diagonal(self._probe())

    def inverse(self, regul: float = 0.0) -> PMatAbstract:
        """Not available: an implicit matrix has no finite inverse form.

        Raises:
            NotImplementedError: always; use :meth:`solve`, or convert first.
        """
        raise NotImplementedError(
            "PMatImplicit has no stored form to invert: use solve(v, regul) (CG), or "
            "PMatDense(m.layer_collection, m.dense()).inverse(regul) for small models."
        )

    def _scale(self, alpha: float | torch.Tensor) -> PMatImplicit:
        diag, dense = self._diag_fn, self._dense_fn
        return PMatImplicit(
            self.layer_collection,
            lambda v: alpha * self._mv(v),
            dtype=self.dtype,
            device=self.device,
            diag=None if diag is None else (lambda: alpha * diag()),
            dense=None if dense is None else (lambda: alpha * dense()),
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PMatImplicit:
        """Not available: the products are computed where the model lives.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "PMatImplicit computes its products where the model lives; move the "
            "model and build the matrix again."
        )

    # -- binary table hooks -------------------------------------------------
    @classmethod
    def _coerce(cls, m: PMatAbstract) -> PMatAbstract:
        return m

    @classmethod
    def _combine(
        cls, op: str, lc: LayerCollection, a: PMatAbstract, b: PMatAbstract
    ) -> PMatImplicit:
        def pair(fa, fb, join):
            return lambda: join(fa(), fb())

        if op == "@":
            return cls(lc, lambda v: a.mv(b.mv(v)), dtype=a.dtype, device=a.device)
        join = torch.add if op == "+" else torch.sub
        return cls(
            lc,
            lambda v: v.unflatten(join(a.mv(v).flatten(), b.mv(v).flatten())),
            dtype=a.dtype,
            device=a.device,
            diag=pair(a.diag, b.diag, join),
            dense=pair(a.dense, b.dense, join),
        )
