"""One calling convention for the matrices the spectral tools accept."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FlatOperator", "as_operator"]


@dataclass(frozen=True)
class FlatOperator:
    """A symmetric ``(size, size)`` operator acting on flat vectors.

    Attributes:
        mv: ``x -> A x`` for ``x`` of shape ``(size,)``.
        size: the dimension.
        dtype: data type of the products.
        device: device of the products.
    """

    mv: Callable[[torch.Tensor], torch.Tensor]
    size: int
    dtype: torch.dtype
    device: torch.device


def as_operator(
    matrix: Any,
    *,
    size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> FlatOperator:
    """Wrap ``matrix`` as a :class:`FlatOperator`.

    Args:
        matrix: a parameter-space matrix (:class:`~nnfim.PMatAbstract`), an
            :class:`~nnfim.FMatDense` (its flat ``(C n, C n)`` view), a square
            tensor ``(m, m)``, a :class:`FlatOperator`, or a callable
            ``x (size,) -> A x (size,)`` (then ``size`` is required).
        size: the dimension, for a callable.
        dtype: data type of the vectors, for a callable (default: torch's default).
        device: device of the vectors, for a callable (default: CPU).

    Returns:
        The operator.

    Raises:
        TypeError: ``matrix`` is none of the above.
        ValueError: a tensor that is not square, or a callable without ``size``.
    """
    from nnfim.fmat import FMatDense
    from nnfim.pmat._base import PMatAbstract
    from nnfim.vector import PVector

    if isinstance(matrix, FlatOperator):
        return matrix
    if isinstance(matrix, PMatAbstract):
        lc = matrix.layer_collection
        pmat = matrix

        def pmv(x: torch.Tensor) -> torch.Tensor:
            return pmat.mv(PVector.from_flat(lc, x)).flatten()

        return FlatOperator(pmv, lc.numel(), matrix.dtype, matrix.device)
    if isinstance(matrix, FMatDense):
        flat = matrix._square("spectrum")
        return FlatOperator(
            lambda x: flat @ x, flat.shape[0], matrix.dtype, matrix.device
        )
    if isinstance(matrix, torch.Tensor):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"expected a square matrix (m, m), got a tensor of shape "
                f"{tuple(matrix.shape)}."
            )
        dense = matrix
        return FlatOperator(
            lambda x: dense @ x, dense.shape[0], dense.dtype, dense.device
        )
    if callable(matrix):
        if size is None or size < 1:
            raise ValueError(
                "a matrix given as a function x -> A x needs size= (its dimension)."
            )
        return FlatOperator(
            matrix,
            int(size),
            dtype or torch.get_default_dtype(),
            torch.device(device) if device is not None else torch.device("cpu"),
        )
    raise TypeError(
        f"expected a PMat, an FMatDense, a square tensor or a function x -> A x, "
        f"got {type(matrix).__name__}."
    )
