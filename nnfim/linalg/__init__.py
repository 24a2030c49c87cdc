"""Matrix-free linear algebra: solves, spectra, trace and diagonal estimators."""

from nnfim.linalg._operator import FlatOperator, as_operator
from nnfim.linalg.cg import cg
from nnfim.linalg.estimators import (
    condition_number,
    frobenius_norm_estimate,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_diag,
    hutchpp_trace,
    nonzero_condition_number,
)
from nnfim.linalg.lanczos import SpectralDensity, lanczos, slq

__all__ = [
    "FlatOperator",
    "SpectralDensity",
    "as_operator",
    "cg",
    "condition_number",
    "frobenius_norm_estimate",
    "hutchinson_diag",
    "hutchinson_trace",
    "hutchpp_diag",
    "hutchpp_trace",
    "lanczos",
    "nonzero_condition_number",
    "slq",
]
