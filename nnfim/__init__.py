"""nnfim: structured Fisher information matrices of PyTorch networks."""

from nnfim.generator import Generator, LayerRule, register_rule, registered_types
from nnfim.layers import LayerCollection
from nnfim.metrics import FIM, FIM_MonteCarlo
from nnfim.pmat import (
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    load,
)
from nnfim.vector import FVector, PVector

__version__ = "0.1.0"

__all__ = [
    "FIM",
    "FIM_MonteCarlo",
    "FVector",
    "Generator",
    "LayerCollection",
    "LayerRule",
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatImplicit",
    "PMatKFAC",
    "PVector",
    "load",
    "register_rule",
    "registered_types",
]
