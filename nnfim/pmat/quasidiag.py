"""NNGeometry's quasi-diagonal: the diagonal plus weight-bias cross terms."""

from __future__ import annotations

import math

import torch

from nnfim.layers import LayerCollection, LayerEntry
from nnfim.pmat._base import LayerwiseMixin, PMatAbstract, check_invertible, check_state
from nnfim.vector import PVector

__all__ = ["PMatQuasiDiag"]


class PMatQuasiDiag(LayerwiseMixin, PMatAbstract):
    """The diagonal plus, per output unit ``o``, the terms between ``b_o`` and ``W_o``.

    For a layer with ``weight`` of shape ``(out, ...)`` and ``bias`` ``(out,)``,
    each output unit's block ``[[diag(d_W_o), c_o], [c_o^T, d_b_o]]`` is an
    arrowhead matrix, solved exactly by its Schur complement (Ollivier, 2015;
    NNGeometry's ``PMatQuasiDiag``). Other layers are diagonal. Memory about
    ``2 P``.

    >>> lc = LayerCollection.from_model(torch.nn.Linear(1, 1))
    >>> m = PMatQuasiDiag(lc, torch.tensor([2.0, 1.0]), {"": torch.tensor([[0.5]])})
    >>> m.dense()
    tensor([[2.0000, 0.5000],
            [0.5000, 1.0000]])
    """

    def __init__(
        self,
        layer_collection: LayerCollection,
        diag: torch.Tensor,
        crosses: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Wrap the diagonal ``(P,)`` and the cross terms (layer -> weight-shaped)."""
        p = layer_collection.numel()
        if tuple(diag.shape) != (p,):
            raise ValueError(
                f"PMatQuasiDiag: diag has shape {tuple(diag.shape)}, expected ({p},)."
            )
        crosses = crosses or {}
        for name, c in crosses.items():
            shapes = dict(layer_collection[name].params)
            if list(shapes) != ["weight", "bias"] or tuple(c.shape) != shapes["weight"]:
                raise ValueError(
                    f"PMatQuasiDiag: cross terms of {name!r} need a layer with weight and "
                    f"bias and the weight's shape, got {tuple(c.shape)}."
                )
        self.layer_collection = layer_collection
        self.data = diag
        self.crosses = {
            n: crosses[n] for n in layer_collection.layer_names if n in crosses
        }

    @property
    def dtype(self) -> torch.dtype:
        """Data type of the stored values."""
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored values."""
        return self.data.device

    def _parts(
        self, layer: LayerEntry, flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's slice as ``(weight (out, w), bias (out,))``."""
        out = layer.params[1][1][0]
        n_weight = math.prod(layer.params[0][1])
        return flat[:n_weight].reshape(out, -1), flat[n_weight:]

    def mv(self, v: PVector) -> PVector:
        """Diagonal product plus the cross terms."""
        self._check_vector(v)
        x = v.flatten()
        y = self.data * x
        lc = self.layer_collection
        for name, c in self.crosses.items():
            sl = lc.layer_slice(name)
            layer = lc[name]
            c2 = c.reshape(c.shape[0], -1)
            xw, xb = self._parts(layer, x[sl])
            extra = torch.cat([(c2 * xb[:, None]).reshape(-1), (c2 * xw).sum(1)])
            y[sl] = y[sl] + extra
        return v.unflatten(y)

    def _layer_dense(self, name: str) -> torch.Tensor:
        out = torch.diag(self.data[self.layer_collection.layer_slice(name)])
        if name in self.crosses:
            c2 = self.crosses[name].reshape(self.crosses[name].shape[0], -1)
            n_out, per = c2.shape
            rows = torch.arange(n_out * per, device=self.device)
            cols = n_out * per + torch.arange(
                n_out, device=self.device
            ).repeat_interleave(per)
            out[rows, cols] = c2.reshape(-1)
            out[cols, rows] = c2.reshape(-1)
        return out

    def diag(self) -> torch.Tensor:
        """The stored diagonal, shape ``(P,)``."""
        return self.data

    def frobenius_norm(self) -> torch.Tensor:
        """``sqrt(||d||^2 + 2 sum ||c||^2)``."""
        total = (self.data * self.data).sum()
        for c in self.crosses.values():
            total = total + 2 * (c * c).sum()
        return total.sqrt()

    def solve(
        self,
        v: PVector,
        regul: float = 0.0,
        *,
        method: str = "exact",
        rtol: float | None = None,
        max_iter: int | None = None,
    ) -> PVector:
        """Solve ``(M + regul I) x = v`` exactly, one arrowhead system per unit.

        Raises:
            torch.linalg.LinAlgError: a diagonal entry or a Schur complement is
                zero at working precision.
        """
        if method == "cg":
            return super().solve(v, regul, rtol=rtol, max_iter=max_iter)
        if method != "exact":
            raise ValueError(f"PMatQuasiDiag.solve: unknown method {method!r}.")
        self._check_vector(v)
        d = self.data + regul
        x = v.flatten()
        lc = self.layer_collection
        schur_values = []
        for name, c in self.crosses.items():
            sl = lc.layer_slice(name)
            c2 = c.reshape(c.shape[0], -1)
            dw, db = self._parts(lc[name], d[sl])
            schur_values.append(db - (c2 * c2 / dw).sum(1))
        check_invertible(torch.cat([d, *schur_values]), 0.0, "PMatQuasiDiag")
        y = x / d
        for (name, c), schur in zip(self.crosses.items(), schur_values, strict=True):
            sl = lc.layer_slice(name)
            c2 = c.reshape(c.shape[0], -1)
            dw, _ = self._parts(lc[name], d[sl])
            uw, ub = self._parts(lc[name], x[sl])
            yb = (ub - (c2 * uw / dw).sum(1)) / schur
            yw = (uw - c2 * yb[:, None]) / dw
            y[sl] = torch.cat([yw.reshape(-1), yb])
        return v.unflatten(y)

    def _scale(self, alpha: float | torch.Tensor) -> PMatQuasiDiag:
        return PMatQuasiDiag(
            self.layer_collection,
            alpha * self.data,
            {n: alpha * c for n, c in self.crosses.items()},
        )

    # -- binary table hooks -------------------------------------------------
    @classmethod
    def _coerce(cls, m: PMatAbstract) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(m, PMatQuasiDiag):
            return m.data, m.crosses
        return m.diag(), {}

    @classmethod
    def _combine(
        cls,
        op: str,
        lc: LayerCollection,
        a: tuple[torch.Tensor, dict[str, torch.Tensor]],
        b: tuple[torch.Tensor, dict[str, torch.Tensor]],
    ) -> PMatQuasiDiag:
        sign = -1.0 if op == "-" else 1.0
        crosses = dict(a[1])
        for name, c in b[1].items():
            crosses[name] = crosses[name] + sign * c if name in crosses else sign * c
        return cls(lc, a[0] + sign * b[0], crosses)

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"diag": self.data}
        names = self.layer_collection.layer_names
        for name, c in self.crosses.items():
            state[f"cross{names.index(name)}"] = c
        return state

    @classmethod
    def _from_state(
        cls, layer_collection: LayerCollection, state: dict[str, torch.Tensor]
    ) -> PMatQuasiDiag:
        names = layer_collection.layer_names
        expected: dict[str, tuple[int, ...]] = {"diag": (layer_collection.numel(),)}
        crosses = {}
        for key in state:
            if (
                key.startswith("cross")
                and key[5:].isdigit()
                and int(key[5:]) < len(names)
            ):
                layer = layer_collection[names[int(key[5:])]]
                expected[key] = dict(layer.params).get("weight", ())
                crosses[layer.name] = state[key]
        check_state(state, expected)
        return cls(layer_collection, state["diag"], crosses)
