"""The abstract parameter-space matrix and the defaults every structure inherits."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from nnfim.layers import LayerCollection
from nnfim.linalg.cg import cg
from nnfim.vector import PVector

__all__ = ["PMatAbstract", "load"]

_FORMAT = "nnfim.pmat"
_FORMAT_VERSION = 1
_CLASSES: dict[str, type[PMatAbstract]] = {}

M = TypeVar("M", bound="PMatAbstract")


class PMatAbstract(ABC):
    """A symmetric ``(P, P)`` matrix over the parameters of a layer collection.

    A concrete structure implements :meth:`mv`, :meth:`dense`, :meth:`diag`,
    ``dtype`` and ``device``; every other operation has a correct default built
    on those, overridden where the structure makes it cheaper or exact.
    Two different structures meet (``+``, ``-``, ``@``) in the single table of
    :mod:`nnfim.pmat._binary`.
    """

    layer_collection: LayerCollection
    #: Whether :meth:`save` / :func:`load` apply (the matrix is plain data).
    storable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None):
            _CLASSES[cls.__name__] = cls

    # -- required ---------------------------------------------------------
    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Data type of the stored values."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the stored values."""

    @abstractmethod
    def mv(self, v: PVector) -> PVector:
        """Matrix-vector product ``M v``."""

    @abstractmethod
    def dense(self) -> torch.Tensor:
        """The matrix as a dense tensor of shape ``(P, P)``, in flat parameter order."""

    @abstractmethod
    def diag(self) -> torch.Tensor:
        """The diagonal, shape ``(P,)``."""

    @abstractmethod
    def _scale(self: M, alpha: float | torch.Tensor) -> M:
        """``alpha * M`` in the same structure."""

    # -- derived ----------------------------------------------------------
    def vTMv(self, v: PVector) -> torch.Tensor:
        """Quadratic form ``v^T M v``, a 0-dim tensor (EWC's penalty)."""
        return v.dot(self.mv(v))

    def trace(self) -> torch.Tensor:
        """Trace, a 0-dim tensor."""
        return self.diag().sum()

    def frobenius_norm(self) -> torch.Tensor:
        """Frobenius norm, a 0-dim tensor (default: through :meth:`dense`)."""
        return torch.linalg.matrix_norm(self.dense())

    def solve(
        self,
        v: PVector,
        regul: float = 0.0,
        *,
        method: str = "cg",
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> PVector:
        """Solve ``(M + regul I) x = v``.

        The default is conjugate gradients on :meth:`mv` (``method="cg"``);
        structures with an exact factorisation override it.

        Args:
            v: right-hand side.
            regul: damping added to the diagonal; ``0`` asks for the exact
                solve and fails on a singular matrix.
            method: ``"cg"`` (the only method of the default).
            rtol: relative residual at which CG stops (default: 1e-6 in float32,
                1e-10 in float64).
            max_iter: CG iteration cap (default: ``10 P``).

        Returns:
            The solution ``x``.

        Raises:
            ValueError: an unknown ``method``.
            torch.linalg.LinAlgError: CG did not reach ``rtol`` (the matrix may
                be singular or not positive definite: pass ``regul > 0``).
        """
        self._check_vector(v)
        if method != "cg":
            raise ValueError(f"{type(self).__name__}.solve: unknown method {method!r}.")
        lc = self.layer_collection

        def op(x: torch.Tensor) -> torch.Tensor:
            out = self.mv(PVector.from_flat(lc, x)).flatten()
            return out + regul * x if regul else out

        x = cg(op, v.flatten(), rtol=rtol, max_iter=max_iter, name=type(self).__name__)
        return PVector.from_flat(lc, x)

    def inverse(self, regul: float = 0.0) -> PMatAbstract:
        """``(M + regul I)^{-1}`` as a matrix (default: a :class:`PMatDense`)."""
        from nnfim.pmat.dense import PMatDense

        return PMatDense(self.layer_collection, self.dense()).inverse(regul)

    def eigvalsh(self) -> torch.Tensor:
        """Eigenvalues in ascending order, shape ``(P,)``."""
        return torch.linalg.eigvalsh(self.dense())

    def layer_blocks(self) -> dict[str, torch.Tensor]:
        """Layer name -> the ``(p_l, p_l)`` diagonal block of that layer.

        The default slices :meth:`dense`; block-structured matrices build their
        blocks directly.
        """
        full = self.dense()
        lc = self.layer_collection
        return {n: full[lc.layer_slice(n), lc.layer_slice(n)] for n in lc.layer_names}

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues ``(P,)`` ascending and eigenvectors as columns ``(P, P)``."""
        return torch.linalg.eigh(self.dense())

    def to(
        self: M,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> M:
        """Move and/or cast the stored values, like ``Tensor.to``.

        Returns a new matrix of the same structure; the original is unchanged.
        """
        state = {k: t.to(device=device, dtype=dtype) for k, t in self._state().items()}
        return type(self)._from_state(self.layer_collection, state)

    def to_scipy(self) -> Any:
        """This matrix as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(P, P)``.

        Products go through :meth:`mv` in the flat parameter order of
        :meth:`PVector.flatten <nnfim.PVector.flatten>`, on the matrix's device
        and in its dtype, so ``scipy.sparse.linalg.eigsh`` or ``cg`` work on
        any structure without forming a dense matrix. scipy is imported here
        only.

        Returns:
            A symmetric ``LinearOperator`` (``rmatvec`` is ``matvec``).

        Raises:
            ImportError: scipy is not installed.

        >>> from scipy.sparse.linalg import eigsh
        >>> lc = LayerCollection.from_model(torch.nn.Linear(3, 1))
        >>> from nnfim import PMatDiag
        >>> op = PMatDiag(lc, torch.tensor([1.0, 2.0, 3.0, 4.0])).to_scipy()
        >>> op.shape, eigsh(op, k=1)[0].round(4)
        ((4, 4), array([4.], dtype=float32))
        """
        from nnfim._scipy import linear_operator

        lc = self.layer_collection

        def matvec(x: torch.Tensor) -> torch.Tensor:
            return self.mv(PVector.from_flat(lc, x)).flatten()

        p = lc.numel()
        return linear_operator(
            (p, p),
            self.dtype,
            self.device,
            matvec,
            matvec,
            owner=type(self).__name__,
        )

    # -- deprecated NNGeometry names ---------------------------------------
    def get_dense_tensor(self) -> torch.Tensor:
        """Deprecated alias of :meth:`dense` (NNGeometry's name)."""
        warnings.warn(
            "get_dense_tensor() is deprecated, use dense()", DeprecationWarning, 2
        )
        return self.dense()

    def get_diag(self) -> torch.Tensor:
        """Deprecated alias of :meth:`diag` (NNGeometry's name)."""
        warnings.warn("get_diag() is deprecated, use diag()", DeprecationWarning, 2)
        return self.diag()

    # -- arithmetic -------------------------------------------------------
    def __mul__(self: M, alpha: float | torch.Tensor) -> M:
        if isinstance(alpha, (int, float)) or (
            isinstance(alpha, torch.Tensor) and alpha.dim() == 0
        ):
            return self._scale(alpha)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self: M, alpha: float | torch.Tensor) -> M:
        return self * (1.0 / alpha)

    def __neg__(self: M) -> M:
        return self._scale(-1.0)

    def __add__(self, other: PMatAbstract) -> PMatAbstract:
        from nnfim.pmat._binary import combine

        return combine("+", self, other)

    def __sub__(self, other: PMatAbstract) -> PMatAbstract:
        from nnfim.pmat._binary import combine

        return combine("-", self, other)

    def __matmul__(self, other: PMatAbstract | PVector) -> PMatAbstract | PVector:
        if isinstance(other, PVector):
            return self.mv(other)
        from nnfim.pmat._binary import combine

        return combine("@", self, other)

    # -- checks -----------------------------------------------------------
    def _check_vector(self, v: PVector) -> None:
        name = type(self).__name__
        if not isinstance(v, PVector):
            raise TypeError(f"{name}: expected a PVector, got {type(v).__name__}.")
        if v.layer_collection != self.layer_collection:
            raise ValueError(
                f"{name}: the vector covers {v.layer_collection}, the matrix covers "
                f"{self.layer_collection}; build both from the same layer collection."
            )
        if v.dtype != self.dtype or v.device != self.device:
            raise ValueError(
                f"{name}: the vector is {v.dtype} on {v.device}, the matrix is "
                f"{self.dtype} on {self.device}; convert one with .to(device, dtype)."
            )

    # -- storage ----------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        """The stored tensors, by name (what :meth:`save` writes)."""
        raise NotImplementedError(
            f"{type(self).__name__} stores no data of its own; convert it first, "
            "e.g. PMatDense(m.layer_collection, m.dense())."
        )

    @classmethod
    def _from_state(
        cls: type[M], layer_collection: LayerCollection, state: dict[str, torch.Tensor]
    ) -> M:
        """Inverse of :meth:`_state`; checks names and shapes."""
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from a file.")

    def state_dict(self) -> dict[str, Any]:
        """The matrix as plain data for a checkpoint.

        A dict of strings, ints, lists and tensors (``"format"``, ``"version"``,
        ``"type"``, ``"layer_collection"``, ``"tensors"``): ``torch.save`` writes
        it, ``torch.load(..., weights_only=True)`` reads it back, and
        :meth:`from_state_dict` or :meth:`load_state_dict` rebuild the matrix.
        The tensors are the stored ones, not copies.

        Raises:
            NotImplementedError: the structure stores no data
                (:class:`~nnfim.PMatImplicit`).

        >>> from nnfim import PMatDiag
        >>> lc = LayerCollection.from_model(torch.nn.Linear(2, 1))
        >>> sd = PMatDiag(lc, torch.ones(3)).state_dict()
        >>> sd["type"], PMatAbstract.from_state_dict(sd).trace()
        ('PMatDiag', tensor(3.))
        """
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "type": type(self).__name__,
            "layer_collection": self.layer_collection.state(),
            "tensors": self._state(),
        }

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> PMatAbstract:
        """A new matrix from :meth:`state_dict`'s output.

        Called on :class:`PMatAbstract` it returns whatever structure was
        stored; called on a concrete class it also checks the structure.

        Args:
            state_dict: what :meth:`state_dict` returned (possibly through
                ``torch.save`` / ``torch.load(weights_only=True)``).

        Returns:
            The matrix.

        Raises:
            ValueError: the dict is malformed, or holds another structure than
                ``cls``.
        """
        mat = _from_payload(state_dict, "state dict", "state dict")
        if cls is not PMatAbstract and not isinstance(mat, cls):
            raise ValueError(
                f"the state dict holds a {type(mat).__name__}, not a {cls.__name__}; "
                "use PMatAbstract.from_state_dict to read any structure."
            )
        return mat

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace this matrix's values, in place, by those of ``state_dict``.

        The stored structure and layer collection must be this matrix's
        (``torch.nn.Module.load_state_dict``'s strict behaviour); what is not
        data (an EKFAC's link to its model) is kept.

        Raises:
            ValueError: a malformed dict, another structure or another layer
                collection.
        """
        new = type(self).from_state_dict(state_dict)
        if type(new) is not type(self):
            raise ValueError(
                f"the state dict holds a {type(new).__name__}, this matrix is a "
                f"{type(self).__name__}."
            )
        if new.layer_collection != self.layer_collection:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state dict covers "
                f"{new.layer_collection}, this matrix covers {self.layer_collection}."
            )
        kept = {k: getattr(self, k) for k in self._kept_on_load if hasattr(self, k)}
        vars(self).clear()
        vars(self).update(vars(new))
        vars(self).update(kept)

    #: attributes that :meth:`load_state_dict` keeps (not data).
    _kept_on_load: ClassVar[tuple[str, ...]] = ()

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` with ``torch.save``."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(
        cls, path: str | Path, map_location: torch.device | str | None = None
    ) -> PMatAbstract:
        """Read a matrix written by :meth:`save` (see :func:`load`).

        Raises:
            ValueError: the file holds another structure than ``cls``.
        """
        mat = load(path, map_location=map_location)
        if cls is not PMatAbstract and not isinstance(mat, cls):
            raise ValueError(
                f"{path}: holds a {type(mat).__name__}, not a {cls.__name__}; "
                "use nnfim.load to read any structure."
            )
        return mat


class LayerwiseMixin:
    """``dense`` and ``layer_blocks`` of a matrix made of one block per layer.

    The class provides ``_layer_dense(name) -> (p_l, p_l)``.
    """

    layer_collection: LayerCollection

    def _layer_dense(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The ``(P, P)`` dense tensor (block diagonal over layers)."""
        names = self.layer_collection.layer_names
        return torch.block_diag(*[self._layer_dense(n) for n in names])

    def layer_blocks(self) -> dict[str, torch.Tensor]:
        """Layer name -> its ``(p_l, p_l)`` block."""
        return {n: self._layer_dense(n) for n in self.layer_collection.layer_names}


def load(
    path: str | Path, map_location: torch.device | str | None = None
) -> PMatAbstract:
    """Read any matrix written by ``PMat*.save``, never unpickling code.

    Args:
        path: the file.
        map_location: as for ``torch.load``.

    Returns:
        The matrix, of the structure it was saved as.

    Raises:
        ValueError: the file is not an nnfim matrix or is malformed.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for bad files
        raise ValueError(f"{path}: not a readable nnfim matrix file ({err}).") from err
    return _from_payload(payload, str(path), "file")


def _from_payload(payload: Any, source: str, what: str) -> PMatAbstract:
    """Check and rebuild a :meth:`PMatAbstract.state_dict` read from ``source``."""
    if not isinstance(payload, Mapping) or payload.get("format") != _FORMAT:
        raise ValueError(
            f"{source}: not an nnfim matrix {what} (no {_FORMAT!r} format entry); "
            "expected what PMat*.state_dict() returns."
        )
    if payload.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"{source}: format version {payload.get('version')!r}, this nnfim reads "
            f"version {_FORMAT_VERSION}."
        )
    kind = payload.get("type")
    if kind not in _CLASSES or not _CLASSES[kind].storable:
        raise ValueError(f"{source}: unknown matrix type {kind!r}.")
    tensors = payload.get("tensors")
    if not isinstance(tensors, Mapping) or not all(
        isinstance(t, torch.Tensor) for t in tensors.values()
    ):
        raise ValueError(f"{source}: malformed tensors entry.")
    try:
        lc = LayerCollection.from_state(payload.get("layer_collection"))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    try:
        return _CLASSES[kind]._from_state(lc, dict(tensors))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{source}: malformed {kind} ({err}).") from err


def check_invertible(evals: torch.Tensor, regul: float, name: str) -> None:
    """Raise when ``M + regul I`` is singular at working precision.

    Args:
        evals: eigenvalues of ``M`` (any shape).
        regul: the damping that will be added.
        name: the structure, for the message.

    Raises:
        torch.linalg.LinAlgError: with what to do about it.
    """
    shifted = evals + regul
    scale = shifted.abs().max()
    tol = scale * torch.finfo(evals.dtype).eps * max(evals.numel(), 1)
    if bool((shifted.abs() <= tol).any()) or bool(scale == 0):
        raise torch.linalg.LinAlgError(
            f"{name}.solve: the matrix is singular (smallest |eigenvalue| "
            f"{float(shifted.abs().min()):.3g} against largest {float(scale):.3g}); "
            "pass regul > 0 to solve (M + regul I) x = v."
        )


def check_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Check that ``state`` has exactly the tensors and shapes of ``expected``.

    Raises:
        ValueError: naming the first difference.
    """
    if set(state) != set(expected):
        raise ValueError(f"tensors {sorted(state)}, expected {sorted(expected)}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{key!r} has shape {tuple(state[key].shape)}, expected {shape}"
            )
