"""nnfim: structured Fisher information matrices of PyTorch networks."""

from nnfim.apps import EKFAC, EWC, KFAC, NaturalGradient, NTKRegressor, ntk_predict
from nnfim.fmat import FMatDense
from nnfim.generator import Generator, LayerRule, register_rule, registered_types
from nnfim.jacobian import Jacobian, per_example_grads
from nnfim.layers import LayerCollection
from nnfim.metrics import FIM, NTK, FIM_MonteCarlo
from nnfim.pmat import (
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    load,
)
from nnfim.vector import FVector, PVector

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "EWC",
    "KFAC",
    "NTKRegressor",
    "NaturalGradient",
    "ntk_predict",
    "FIM",
    "NTK",
    "FIM_MonteCarlo",
    "FMatDense",
    "FVector",
    "Generator",
    "Jacobian",
    "LayerCollection",
    "LayerRule",
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatImplicit",
    "PMatKFAC",
    "PMatLowRank",
    "PMatQuasiDiag",
    "PVector",
    "load",
    "per_example_grads",
    "register_rule",
    "registered_types",
]
