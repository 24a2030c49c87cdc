"""Parameter-space matrices: one file per structure."""

from nnfim.pmat._base import PMatAbstract, load
from nnfim.pmat.blockdiag import PMatBlockDiag
from nnfim.pmat.dense import PMatDense
from nnfim.pmat.diag import PMatDiag
from nnfim.pmat.implicit import PMatImplicit

__all__ = [
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatImplicit",
    "load",
]
