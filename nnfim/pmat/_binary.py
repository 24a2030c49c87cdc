"""The one table where two matrix structures meet (``+``, ``-``, ``@``).

Each pair of structures maps to the structure its result has; both operands
are converted to that structure's storage (``_coerce``) and combined there
(``_combine``). A pair missing from the table raises ``NotImplementedError``
naming both types: raw storages of different structures never broadcast.
"""

from __future__ import annotations

from typing import Any

from nnfim.pmat._base import PMatAbstract
from nnfim.pmat.blockdiag import PMatBlockDiag
from nnfim.pmat.dense import PMatDense
from nnfim.pmat.diag import PMatDiag
from nnfim.pmat.implicit import PMatImplicit

__all__ = ["combine", "register_pair"]

_TABLE: dict[tuple[type, type], Any] = {}


def register_pair(a: type, b: type, result: type) -> None:
    """Declare that ``a op b`` and ``b op a`` are computed in structure ``result``."""
    _TABLE[(a, b)] = result
    _TABLE[(b, a)] = result


for _dense_with in (PMatDense, PMatDiag, PMatBlockDiag):
    register_pair(PMatDense, _dense_with, PMatDense)
register_pair(PMatDiag, PMatDiag, PMatDiag)
register_pair(PMatBlockDiag, PMatBlockDiag, PMatBlockDiag)
register_pair(PMatDiag, PMatBlockDiag, PMatBlockDiag)
for _any in (PMatDense, PMatDiag, PMatBlockDiag, PMatImplicit):
    register_pair(PMatImplicit, _any, PMatImplicit)


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
    result = _TABLE.get((type(a), type(b)))
    if result is None:
        raise NotImplementedError(
            f"{name_a} {op} {name_b} is not defined; convert one operand first, "
            f"e.g. PMatDense(m.layer_collection, m.dense())."
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
