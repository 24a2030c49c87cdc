"""nnfim: structured Fisher information matrices of PyTorch networks."""

from nnfim.analysis import Hessian, fim_spectrum
from nnfim.apps import (
    EKFAC,
    EWC,
    KFAC,
    NaturalGradient,
    NTKRegressor,
    TrainingMonitor,
    load_run,
    ntk_predict,
)
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
    "Hessian",
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
    "TrainingMonitor",
    "fim_spectrum",
    "load",
    "load_run",
    "per_example_grads",
    "register_rule",
    "registered_types",
]
