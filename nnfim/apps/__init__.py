"""Applications: continual learning (EWC), second-order optimizers, NTK regression."""

from nnfim.apps.ewc import EWC
from nnfim.apps.ntk import NTKRegressor, ntk_predict
from nnfim.apps.optim import EKFAC, KFAC, NaturalGradient

__all__ = ["EKFAC", "EWC", "KFAC", "NTKRegressor", "NaturalGradient", "ntk_predict"]
