"""Pixel noise models p(x | s): known-parameter (Gaussian, Poisson-Gaussian) and fitted (GMM,
histogram), with fitting, diagnostics and the Noise2Void bootstrap."""

from .analytic import GaussianNoiseModel, PoissonGaussianNoiseModel
from .base import (
    NoiseModel,
    NoiseModelRangeWarning,
    noise_model_from_state,
    noise_model_kinds,
    register_noise_model,
)
from .channels import load_noise_model
from .diagnostics import (
    binned_statistics,
    diagnostics_figure,
    fit_verdict,
    heldout_nll,
    save_figure,
    verdict_warning,
)
from .fitting import (
    bootstrap_pairs,
    diagnose,
    fit_bootstrap,
    fit_from_calibration,
    fit_from_clean,
    fit_noise_model,
)
from .gmm import GMMNoiseModel
from .histogram import HistogramNoiseModel
from .pairs import (
    NoiseFitWarning,
    NoisePairs,
    check_pairs,
    pairs_from_calibration,
    pairs_from_clean,
    pairs_from_pseudo_clean,
    split_pairs,
)

__all__ = [
    "GMMNoiseModel",
    "GaussianNoiseModel",
    "HistogramNoiseModel",
    "NoiseFitWarning",
    "NoiseModel",
    "NoiseModelRangeWarning",
    "NoisePairs",
    "PoissonGaussianNoiseModel",
    "binned_statistics",
    "bootstrap_pairs",
    "check_pairs",
    "diagnose",
    "diagnostics_figure",
    "fit_bootstrap",
    "fit_from_calibration",
    "fit_from_clean",
    "fit_noise_model",
    "fit_verdict",
    "heldout_nll",
    "load_noise_model",
    "noise_model_from_state",
    "noise_model_kinds",
    "pairs_from_calibration",
    "pairs_from_clean",
    "pairs_from_pseudo_clean",
    "register_noise_model",
    "save_figure",
    "split_pairs",
    "verdict_warning",
]
