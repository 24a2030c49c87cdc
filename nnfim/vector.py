"""Whole-network vectors in parameter space (:class:`PVector`) and function space."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn

from nnfim.layers import LayerCollection

__all__ = ["FVector", "PVector"]

Scalar = Union[int, float]


class PVector:
    """A vector in parameter space: qualified parameter name -> tensor.

    Arithmetic (``+ - * /`` with scalars and vectors of the same layer
    collection), ``dot`` and ``norm`` work as for flat tensors.

    >>> from torch import nn
    >>> model = nn.Linear(3, 2)
    >>> w = PVector.from_model(model).clone()
    >>> step = PVector.from_flat(w.layer_collection, torch.ones(8))
    >>> (w + 0.5 * step - w).norm().item()
    1.4142135381698608
    """

    def __init__(
        self, layer_collection: LayerCollection, tensors: dict[str, torch.Tensor]
    ) -> None:
        """Wrap ``tensors`` (qualified name -> tensor) laid out as ``layer_collection``.

        Raises:
            ValueError: a name is missing or a shape differs from the collection's.
        """
        shapes = layer_collection.param_shapes
        if set(tensors) != set(shapes):
            missing = sorted(set(shapes) - set(tensors))
            extra = sorted(set(tensors) - set(shapes))
            raise ValueError(
                f"PVector: tensors do not match the layer collection "
                f"(missing {missing}, unexpected {extra})."
            )
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"PVector: {name!r} has shape {tuple(tensors[name].shape)}, "
                    f"the layer collection says {shape}."
                )
        self.layer_collection = layer_collection
        self._tensors = {name: tensors[name] for name in shapes}

    # -- construction -----------------------------------------------------
    @classmethod
    def from_model(
        cls, model: nn.Module, layer_collection: LayerCollection | None = None
    ) -> PVector:
        """The model's current parameters (the tensors themselves, not copies).

        Use ``.clone()`` to keep a snapshot such as EWC's anchor weights.
        """
        lc = layer_collection or LayerCollection.from_model(model)
        return cls(lc, dict(lc.check_model(model)))

    @classmethod
    def from_model_grad(
        cls, model: nn.Module, layer_collection: LayerCollection | None = None
    ) -> PVector:
        """The model's current ``.grad`` tensors.

        Raises:
            ValueError: a parameter has no gradient (call ``loss.backward()`` first).
        """
        lc = layer_collection or LayerCollection.from_model(model)
        grads = {}
        for name, p in lc.check_model(model).items():
            if p.grad is None:
                raise ValueError(
                    f"parameter {name!r} has no .grad: run loss.backward() before "
                    "PVector.from_model_grad, or leave the layer out of the collection."
                )
            grads[name] = p.grad
        return cls(lc, grads)

    @classmethod
    def from_flat(
        cls, layer_collection: LayerCollection, flat: torch.Tensor
    ) -> PVector:
        """Split a flat tensor of shape ``(numel,)`` along ``layer_collection``."""
        return cls(layer_collection, layer_collection.unflatten(flat))

    @classmethod
    def zeros_like_model(
        cls, model: nn.Module, layer_collection: LayerCollection | None = None
    ) -> PVector:
        """A zero vector shaped, typed and placed like the model's parameters."""
        v = cls.from_model(model, layer_collection)
        return v.apply(torch.zeros_like)

    # -- views ------------------------------------------------------------
    def flatten(self) -> torch.Tensor:
        """All entries as one tensor of shape ``(numel,)``."""
        return self.layer_collection.flatten(self._tensors)

    def unflatten(self, flat: torch.Tensor) -> PVector:
        """A vector of this layout holding ``flat`` (shape ``(numel,)``)."""
        return PVector.from_flat(self.layer_collection, flat)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Qualified name -> tensor (the stored tensors, not copies)."""
        return dict(self._tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Iterate over ``(qualified name, tensor)`` pairs in flat order."""
        return iter(self._tensors.items())

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the entries."""
        return next(iter(self._tensors.values())).dtype

    @property
    def device(self) -> torch.device:
        """Device of the entries."""
        return next(iter(self._tensors.values())).device

    def __repr__(self) -> str:
        return (
            f"PVector(numel={self.layer_collection.numel()}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    # -- model ------------------------------------------------------------
    def copy_to_model(self, model: nn.Module) -> None:
        """Write these values into the model's parameters (in place, no autograd)."""
        params = self.layer_collection.check_model(model)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self._tensors[name])

    # -- elementwise ------------------------------------------------------
    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PVector:
        """A new vector with ``fn`` applied to every tensor."""
        return PVector(self.layer_collection, {n: fn(t) for n, t in self.items()})

    def clone(self) -> PVector:
        """A copy that shares no storage (still attached to autograd)."""
        return self.apply(torch.clone)

    def detach(self) -> PVector:
        """The same values, detached from autograd."""
        return self.apply(torch.Tensor.detach)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PVector:
        """Move and/or cast every tensor, like ``Tensor.to``."""
        return self.apply(lambda t: t.to(device=device, dtype=dtype))

    # -- checkpoints --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (strings, lists, tensors).

        ``{"format": "nnfim.pvector", "version": 1, "layer_collection": [...],
        "tensors": {name: tensor}}``, readable with
        ``torch.load(..., weights_only=True)``; the tensors are the stored ones
        (detach them first if they carry autograd history).

        >>> w = PVector.from_model(torch.nn.Linear(2, 1)).detach()
        >>> back = PVector.from_state_dict(w.state_dict())
        >>> (back - w).norm().item()
        0.0
        """
        return {
            "format": _PVECTOR_FORMAT,
            "version": 1,
            "layer_collection": self.layer_collection.state(),
            "tensors": dict(self._tensors),
        }

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> PVector:
        """A new vector from :meth:`state_dict`'s output.

        Raises:
            ValueError: not what :meth:`state_dict` returns.
        """
        if (
            not isinstance(state_dict, Mapping)
            or state_dict.get("format") != _PVECTOR_FORMAT
            or state_dict.get("version") != 1
            or not isinstance(state_dict.get("tensors"), Mapping)
            or not all(
                isinstance(t, torch.Tensor) for t in state_dict["tensors"].values()
            )
        ):
            raise ValueError(
                f"not a PVector state dict: expected format={_PVECTOR_FORMAT!r}, "
                "version=1, a layer_collection and a dict of tensors, as "
                "PVector.state_dict() returns."
            )
        lc = LayerCollection.from_state(state_dict.get("layer_collection"))
        return cls(lc, dict(state_dict["tensors"]))

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the values in place (same layer collection required).

        Raises:
            ValueError: a malformed dict or another layer collection.
        """
        new = PVector.from_state_dict(state_dict)
        if new.layer_collection != self.layer_collection:
            raise ValueError(
                f"PVector.load_state_dict: the state dict covers "
                f"{new.layer_collection}, this vector covers {self.layer_collection}."
            )
        self._tensors = new._tensors

    def _check_other(self, other: PVector, op: str) -> None:
        if not isinstance(other, PVector):
            raise TypeError(f"PVector {op} {type(other).__name__} is not defined.")
        if other.layer_collection != self.layer_collection:
            raise ValueError(
                f"PVector {op}: the two vectors cover different layer collections "
                f"({self.layer_collection} vs {other.layer_collection}); build both "
                "from the same model and layer collection."
            )

    def _binary(
        self, other: PVector | Scalar | torch.Tensor, op: str, fn: Callable
    ) -> PVector:
        if isinstance(other, PVector):
            self._check_other(other, op)
            return PVector(
                self.layer_collection, {n: fn(t, other[n]) for n, t in self.items()}
            )
        if isinstance(other, (int, float)) or (
            isinstance(other, torch.Tensor) and other.dim() == 0
        ):
            return PVector(
                self.layer_collection, {n: fn(t, other) for n, t in self.items()}
            )
        return NotImplemented

    def __add__(self, other: PVector) -> PVector:
        if isinstance(other, (int, float, torch.Tensor)):
            return NotImplemented
        return self._binary(other, "+", torch.add)

    def __sub__(self, other: PVector) -> PVector:
        if isinstance(other, (int, float, torch.Tensor)):
            return NotImplemented
        return self._binary(other, "-", torch.sub)

    def __mul__(self, other: PVector | Scalar | torch.Tensor) -> PVector:
        return self._binary(other, "*", torch.mul)

    def __rmul__(self, other: Scalar | torch.Tensor) -> PVector:
        return self._binary(other, "*", torch.mul)

    def __truediv__(self, other: PVector | Scalar | torch.Tensor) -> PVector:
        return self._binary(other, "/", torch.div)

    def __neg__(self) -> PVector:
        return self.apply(torch.neg)

    def dot(self, other: PVector) -> torch.Tensor:
        """Inner product, a 0-dim tensor."""
        self._check_other(other, "dot")
        return sum(
            (torch.dot(t.reshape(-1), other[n].reshape(-1)) for n, t in self.items()),
            start=torch.zeros((), dtype=self.dtype, device=self.device),
        )

    def norm(self, p: float = 2) -> torch.Tensor:
        """Vector p-norm of all entries, a 0-dim tensor."""
        return torch.linalg.vector_norm(self.flatten(), ord=p)


class FVector:
    """A vector in function space: one value per output and example.

    Stored as a tensor of shape ``(n_output, n_examples)``, NNGeometry's layout.
    """

    def __init__(self, data: torch.Tensor) -> None:
        """Wrap ``data`` of shape ``(n_output, n_examples)``."""
        if data.dim() != 2:
            raise ValueError(
                f"FVector expects a tensor of shape (n_output, n_examples), "
                f"got {tuple(data.shape)}."
            )
        self.data = data

    @property
    def n_output(self) -> int:
        """Number of outputs C."""
        return self.data.shape[0]

    @property
    def n_examples(self) -> int:
        """Number of examples n."""
        return self.data.shape[1]

    def flatten(self) -> torch.Tensor:
        """Entries as shape ``(n_output * n_examples,)``, output-major."""
        return self.data.reshape(-1)

    def _check(self, other: FVector, op: str) -> None:
        if not isinstance(other, FVector) or other.data.shape != self.data.shape:
            shape = getattr(getattr(other, "data", None), "shape", type(other).__name__)
            raise ValueError(
                f"FVector {op}: shapes {tuple(self.data.shape)} and {shape} differ."
            )

    def __add__(self, other: FVector) -> FVector:
        self._check(other, "+")
        return FVector(self.data + other.data)

    def __sub__(self, other: FVector) -> FVector:
        self._check(other, "-")
        return FVector(self.data - other.data)

    def __mul__(self, other: Scalar | torch.Tensor) -> FVector:
        return FVector(self.data * other)

    __rmul__ = __mul__

    def __truediv__(self, other: Scalar | torch.Tensor) -> FVector:
        return FVector(self.data / other)

    def __neg__(self) -> FVector:
        return FVector(-self.data)

    def dot(self, other: FVector) -> torch.Tensor:
        """Inner product, a 0-dim tensor."""
        self._check(other, "dot")
        return torch.dot(self.flatten(), other.flatten())

    def norm(self, p: float = 2) -> torch.Tensor:
        """Vector p-norm of all entries, a 0-dim tensor."""
        return torch.linalg.vector_norm(self.data, ord=p)

    def clone(self) -> FVector:
        """A copy."""
        return FVector(self.data.clone())

    def detach(self) -> FVector:
        """The same values, detached from autograd."""
        return FVector(self.data.detach())

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FVector:
        """Move and/or cast, like ``Tensor.to``."""
        return FVector(self.data.to(device=device, dtype=dtype))

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: ``{"format": "nnfim.fvector", "data": (C, n)}``."""
        return {"format": _FVECTOR_FORMAT, "version": 1, "data": self.data}

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> FVector:
        """A new vector from :meth:`state_dict`'s output.

        Raises:
            ValueError: not what :meth:`state_dict` returns.
        """
        if (
            not isinstance(state_dict, Mapping)
            or state_dict.get("format") != _FVECTOR_FORMAT
            or state_dict.get("version") != 1
            or not isinstance(state_dict.get("data"), torch.Tensor)
        ):
            raise ValueError(
                f"not an FVector state dict: expected format={_FVECTOR_FORMAT!r}, "
                "version=1 and a tensor 'data', as FVector.state_dict() returns."
            )
        return cls(state_dict["data"])

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the values in place (same shape required).

        Raises:
            ValueError: a malformed dict or another shape.
        """
        new = FVector.from_state_dict(state_dict)
        if new.data.shape != self.data.shape:
            raise ValueError(
                f"FVector.load_state_dict: the state dict has shape "
                f"{tuple(new.data.shape)}, this vector {tuple(self.data.shape)}."
            )
        self.data = new.data

    def __repr__(self) -> str:
        return f"FVector(n_output={self.n_output}, n_examples={self.n_examples})"


_PVECTOR_FORMAT = "nnfim.pvector"
_FVECTOR_FORMAT = "nnfim.fvector"
