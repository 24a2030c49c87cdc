"""Curvature analysis: Hessian and GGN, Fisher spectra, gradient noise, landscapes."""

from nnfim.analysis.gradients import GradientStats, gradient_statistics, weight_norms
from nnfim.analysis.hessian import GGN, Hessian, batch_loss, hessian_vector_product
from nnfim.analysis.landscape import (
    landscape_1d,
    landscape_2d,
    random_direction,
    top_eigenvectors,
)
from nnfim.analysis.spectrum import FIMSpectrum, fim_spectrum

__all__ = [
    "GGN",
    "FIMSpectrum",
    "GradientStats",
    "Hessian",
    "batch_loss",
    "fim_spectrum",
    "gradient_statistics",
    "hessian_vector_product",
    "landscape_1d",
    "landscape_2d",
    "random_direction",
    "top_eigenvectors",
    "weight_norms",
]
