"""Pixel noise models p(x | s)."""

from .analytic import GaussianNoiseModel, PoissonGaussianNoiseModel
from .base import (
    NoiseModel,
    load_noise_model,
    noise_model_from_state,
    noise_model_kinds,
    register_noise_model,
)

__all__ = [
    "GaussianNoiseModel",
    "NoiseModel",
    "PoissonGaussianNoiseModel",
    "load_noise_model",
    "noise_model_from_state",
    "noise_model_kinds",
    "register_noise_model",
]
