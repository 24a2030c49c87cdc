"""Parameter-space matrices: one file per structure."""

from nnfim.pmat._base import PMatAbstract, load
from nnfim.pmat.blockdiag import PMatBlockDiag
from nnfim.pmat.dense import PMatDense
from nnfim.pmat.diag import PMatDiag
from nnfim.pmat.ekfac import PMatEKFAC
from nnfim.pmat.implicit import PMatImplicit
from nnfim.pmat.kfac import PMatKFAC
from nnfim.pmat.lowrank import PMatLowRank
from nnfim.pmat.quasidiag import PMatQuasiDiag

__all__ = [
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatImplicit",
    "PMatKFAC",
    "PMatLowRank",
    "PMatQuasiDiag",
    "load",
]
