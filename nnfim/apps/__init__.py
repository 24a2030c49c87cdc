"""Applications: EWC, second-order optimizers, NTK regression, the training monitor."""

from nnfim.apps.ewc import EWC
from nnfim.apps.monitor import Run, TrainingMonitor, load_run, save_run
from nnfim.apps.ntk import NTKRegressor, ntk_predict
from nnfim.apps.optim import EKFAC, KFAC, NaturalGradient

__all__ = [
    "EKFAC",
    "EWC",
    "KFAC",
    "NTKRegressor",
    "NaturalGradient",
    "Run",
    "TrainingMonitor",
    "load_run",
    "ntk_predict",
    "save_run",
]
