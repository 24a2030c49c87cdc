"""The one table where two matrix structures meet (``+``, ``-``, ``@``).

Each entry ``(type of a, type of b, op)`` names the structure the result has;
both operands are converted to that structure's storage (``_coerce``) and
combined there (``_combine``). A combination missing from the table raises
``NotImplementedError`` naming both types: raw storages of different
structures never broadcast into each other.

The results are exact: a sum of two Kronecker products is not one, so
``PMatKFAC + PMatKFAC`` is a :class:`PMatBlockDiag`; a product of two
quasi-diagonal matrices is dense.
"""

from __future__ import annotations

from typing import Any

from nnfim.pmat._base import PMatAbstract
from nnfim.pmat.blockdiag import PMatBlockDiag
from nnfim.pmat.dense import PMatDense
from nnfim.pmat.diag import PMatDiag
from nnfim.pmat.ekfac import PMatEKFAC
from nnfim.pmat.implicit import PMatImplicit
from nnfim.pmat.kfac import PMatKFAC
from nnfim.pmat.lowrank import PMatLowRank
from nnfim.pmat.quasidiag import PMatQuasiDiag

__all__ = ["combine", "register_pair"]

_TABLE: dict[tuple[type, type, str], Any] = {}
_OPS = ("+", "-", "@")


def register_pair(a: type, b: type, result: type, ops: tuple[str, ...] = _OPS) -> None:
    """Declare that ``a op b`` and ``b op a`` are computed in structure ``result``."""
    for op in ops:
        _TABLE[(a, b, op)] = result
        _TABLE[(b, a, op)] = result


_STORED: tuple[type, ...] = (
    PMatDense,
    PMatDiag,
    PMatBlockDiag,
    PMatKFAC,
    PMatEKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)
_LAYERWISE: tuple[type, ...] = (
    PMatBlockDiag,
    PMatKFAC,
    PMatEKFAC,
    PMatQuasiDiag,
    PMatDiag,
)

for _x in _STORED:
    register_pair(PMatDense, _x, PMatDense)
    register_pair(PMatLowRank, _x, PMatDense)
for _i, _x in enumerate(_LAYERWISE):
    for _y in _LAYERWISE[_i:]:
        register_pair(_x, _y, PMatBlockDiag)
register_pair(PMatDiag, PMatDiag, PMatDiag)
for _x in (PMatDiag, PMatQuasiDiag):
    register_pair(PMatQuasiDiag, _x, PMatQuasiDiag, ops=("+", "-"))
register_pair(PMatLowRank, PMatLowRank, PMatLowRank, ops=("+",))
for _x in (*_STORED, PMatImplicit):
    register_pair(PMatImplicit, _x, PMatImplicit)


def combine(op: str, a: PMatAbstract, b: PMatAbstract) -> PMatAbstract:
    """``a op b`` for ``op`` in ``"+"``, ``"-"``, ``"@"``.

    Raises:
        NotImplementedError: the pair of structures is not in the table.
        ValueError: the two matrices cover different parameters, or differ in
            dtype or device.
    """
    if not isinstance(b, PMatAbstract):
        return NotImplemented
    name_a, name_b = type(a).__name__, type(b).__name__
    result = _TABLE.get((type(a), type(b), op))
    if result is None:
        raise NotImplementedError(
            f"{name_a} {op} {name_b} is not defined; convert one operand first, "
            f"e.g. PMatDense.from_pmat(m)."
        )
    if a.layer_collection != b.layer_collection:
        raise ValueError(
            f"{name_a} {op} {name_b}: the matrices cover different layer collections."
        )
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{name_a} {op} {name_b}: {a.dtype} on {a.device} against {b.dtype} on "
            f"{b.device}; convert one with .to(device, dtype)."
        )
    return result._combine(op, a.layer_collection, result._coerce(a), result._coerce(b))
