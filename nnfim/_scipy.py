"""SciPy ``LinearOperator`` views of nnfim matrices (scipy is optional)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["linear_operator"]

_NUMPY_DTYPES = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def linear_operator(
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    matvec: TensorFn,
    rmatvec: TensorFn,
    matmat: TensorFn | None = None,
    owner: str = "matrix",
) -> Any:
    """Wrap torch products as a ``scipy.sparse.linalg.LinearOperator``.

    NumPy arrays coming from SciPy are cast to ``dtype`` and moved to
    ``device``; results come back as NumPy arrays of the same dtype, on the host.

    Args:
        shape: ``(rows, cols)`` of the flat operator.
        dtype: the torch data type of the products.
        device: where the products run.
        matvec: ``(cols,) -> (rows,)``.
        rmatvec: ``(rows,) -> (cols,)`` (the transpose product).
        matmat: ``(cols, k) -> (rows, k)``; default: ``matvec`` column by column.
        owner: the caller's name, for error messages.

    Returns:
        The ``LinearOperator``.

    Raises:
        ImportError: scipy is not installed.
        TypeError: ``dtype`` has no NumPy counterpart (e.g. ``bfloat16``).
    """
    try:
        from scipy.sparse.linalg import LinearOperator
    except ImportError as err:
        raise ImportError(
            f"{owner}.to_scipy() needs scipy, which is not installed: "
            "pip install scipy (or pip install 'nnfim[scipy]')."
        ) from err
    if dtype not in _NUMPY_DTYPES:
        raise TypeError(
            f"{owner}.to_scipy(): {dtype} has no NumPy counterpart; convert first, "
            "e.g. m.to(dtype=torch.float32)."
        )
    np_dtype = np.dtype(_NUMPY_DTYPES[dtype])

    def to_torch(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np_dtype)).to(device)

    def to_numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    def _matvec(x: np.ndarray) -> np.ndarray:
        return to_numpy(matvec(to_torch(x).reshape(-1)))

    def _rmatvec(x: np.ndarray) -> np.ndarray:
        return to_numpy(rmatvec(to_torch(x).reshape(-1)))

    def _matmat(x: np.ndarray) -> np.ndarray:
        xt = to_torch(x)
        if matmat is not None:
            return to_numpy(matmat(xt))
        cols = [matvec(xt[:, j]) for j in range(xt.shape[1])]
        return to_numpy(torch.stack(cols, dim=1))

    return LinearOperator(
        shape, matvec=_matvec, rmatvec=_rmatvec, matmat=_matmat, dtype=np_dtype
    )
