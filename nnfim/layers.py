"""Which parameters a matrix or a vector covers, in which order."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LayerCollection", "LayerEntry"]


@dataclass(frozen=True)
class LayerEntry:
    """One layer: a module that owns parameters directly.

    Attributes:
        name: the module's qualified name in the model (``""`` for the root).
        kind: the module's class name, e.g. ``"Linear"``.
        params: ``(parameter name, shape)`` pairs in the module's own order,
            for instance ``(("weight", (10, 5)), ("bias", (10,)))``.
    """

    name: str
    kind: str
    params: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def numel(self) -> int:
        """Number of scalar parameters of the layer."""
        return sum(math.prod(shape) for _, shape in self.params)

    def full_name(self, param: str) -> str:
        """Qualified name of one of the layer's parameters in the model."""
        return f"{self.name}.{param}" if self.name else param


class LayerCollection:
    """An ordered set of layers and their parameters.

    The order is the order of ``model.named_modules()`` and, inside a layer,
    that of ``module.named_parameters(recurse=False)``. Flat vectors and dense
    matrices use it for their rows.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> lc = LayerCollection.from_model(model)
    >>> lc.layer_names, lc.numel()
    (('0', '2'), 11)
    """

    def __init__(self, layers: Iterable[LayerEntry] = ()) -> None:
        self._layers: tuple[LayerEntry, ...] = tuple(layers)
        names = [layer.name for layer in self._layers]
        if len(set(names)) != len(names):
            raise ValueError(f"LayerCollection: duplicate layer names in {names}.")
        self._offsets: dict[str, int] = {}
        start = 0
        for layer in self._layers:
            self._offsets[layer.name] = start
            start += layer.numel
        self._numel = start

    # -- construction -----------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        names: Sequence[str] | None = None,
        types: Sequence[type[nn.Module]] | None = None,
        trainable_only: bool = True,
    ) -> LayerCollection:
        """Collect every module of ``model`` that owns parameters.

        Args:
            model: the network.
            names: keep only the modules with these qualified names.
            types: keep only the modules that are instances of these types.
            trainable_only: leave out parameters with ``requires_grad=False``
                (and layers left with none).

        Returns:
            The collection, in ``model.named_modules()`` order.

        A parameter shared by several modules (tied weights) is listed once,
        with the first module that owns it.

        Raises:
            ValueError: a name in ``names`` is not a module owning parameters.
        """
        layers = []
        seen: set[int] = set()
        for mod_name, module in model.named_modules():
            params = []
            for p_name, p in module.named_parameters(recurse=False):
                if trainable_only and not p.requires_grad:
                    continue
                if id(p) in seen:  # tied: the parameter belongs to its first module
                    continue
                seen.add(id(p))
                params.append((p_name, tuple(p.shape)))
            if params:
                layers.append(
                    LayerEntry(mod_name, type(module).__name__, tuple(params))
                )
        lc = cls(layers)
        if names is not None or types is not None:
            lc = lc.subset(names=names, types=types, model=model)
        return lc

    def subset(
        self,
        *,
        names: Sequence[str] | None = None,
        types: Sequence[type[nn.Module]] | None = None,
        model: nn.Module | None = None,
    ) -> LayerCollection:
        """Keep the layers whose name is in ``names`` and/or whose type is in ``types``.

        Args:
            names: qualified module names to keep.
            types: module types to keep (``model`` is needed to resolve them).
            model: the network the collection was built from.

        Returns:
            A new collection, in this collection's order.

        Raises:
            ValueError: an unknown name, or ``types`` without ``model``.
        """
        keep = list(self._layers)
        if names is not None:
            unknown = sorted(set(names) - {layer.name for layer in keep})
            if unknown:
                raise ValueError(
                    f"LayerCollection.subset: no layer named {unknown}; "
                    f"known layers: {list(self.layer_names)}."
                )
            keep = [layer for layer in keep if layer.name in set(names)]
        if types is not None:
            if model is None:
                raise ValueError("LayerCollection.subset(types=...) needs model=.")
            modules = dict(model.named_modules())
            keep = [
                layer for layer in keep if isinstance(modules[layer.name], tuple(types))
            ]
        return LayerCollection(keep)

    # -- queries ----------------------------------------------------------
    @property
    def layers(self) -> tuple[LayerEntry, ...]:
        """The layers, in order."""
        return self._layers

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Qualified module names of the layers, in order."""
        return tuple(layer.name for layer in self._layers)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Qualified parameter names, in flat order."""
        return tuple(
            layer.full_name(p) for layer in self._layers for p, _ in layer.params
        )

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Qualified parameter name -> shape, in flat order."""
        return {
            layer.full_name(p): shape
            for layer in self._layers
            for p, shape in layer.params
        }

    def numel(self) -> int:
        """Total number of scalar parameters."""
        return self._numel

    def layer_slice(self, name: str) -> slice:
        """Rows of layer ``name`` in flat vectors."""
        start = self._offsets[name]
        return slice(start, start + self[name].numel)

    def __getitem__(self, name: str) -> LayerEntry:
        for layer in self._layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in {list(self.layer_names)}")

    def __iter__(self) -> Iterator[LayerEntry]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerCollection) and self._layers == other._layers

    def __hash__(self) -> int:
        return hash(self._layers)

    def __repr__(self) -> str:
        inner = ", ".join(f"{layer.name or '<root>'}:{layer.kind}" for layer in self)
        return f"LayerCollection([{inner}], numel={self._numel})"

    # -- flat <-> dict ----------------------------------------------------
    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``name -> tensor`` into one flat tensor of shape ``(numel,)``."""
        return torch.cat([tensors[n].reshape(-1) for n in self.param_names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat tensor of shape ``(numel,)`` into ``name -> tensor`` views."""
        if flat.dim() != 1 or flat.numel() != self._numel:
            raise ValueError(
                f"expected a flat tensor of shape ({self._numel},), "
                f"got {tuple(flat.shape)}."
            )
        out = {}
        start = 0
        for name, shape in self.param_shapes.items():
            size = math.prod(shape)
            out[name] = flat[start : start + size].view(shape)
            start += size
        return out

    # -- serialisation ----------------------------------------------------
    def state(self) -> list[Any]:
        """Plain-data description (lists, strings, ints) for ``torch.save``."""
        return [
            [layer.name, layer.kind, [[p, list(s)] for p, s in layer.params]]
            for layer in self._layers
        ]

    @classmethod
    def from_state(cls, state: Any) -> LayerCollection:
        """Inverse of :meth:`state`.

        Raises:
            ValueError: ``state`` is not what :meth:`state` writes.
        """
        try:
            layers = [
                LayerEntry(
                    str(name),
                    str(kind),
                    tuple((str(p), tuple(int(d) for d in s)) for p, s in params),
                )
                for name, kind, params in state
            ]
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed layer collection description: {err}") from err
        return cls(layers)

    def check_model(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters named by this collection, checked for shape.

        Raises:
            ValueError: a parameter is missing from ``model`` or has another shape.
        """
        found = dict(model.named_parameters(remove_duplicate=False))
        out = {}
        for name, shape in self.param_shapes.items():
            if name not in found:
                raise ValueError(
                    f"the model has no parameter {name!r} that the layer "
                    "collection names; was the collection built from another model?"
                )
            if tuple(found[name].shape) != shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(found[name].shape)} in "
                    f"the model but {shape} in the layer collection."
                )
            out[name] = found[name]
        return out
