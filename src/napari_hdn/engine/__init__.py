"""The headless HDN engine: no Qt, no napari. Importable on any server."""

from .config import LATENT_MODES, OFF_MODES, ModelConfig, TrainingConfig
from .data import Normalisation, to_frames
from .device import available_devices, resolve_device
from .errors import (
    DeviceError,
    HDNError,
    HDNWarning,
    InputError,
    ModelFileError,
    OptionError,
    OutputError,
    StopRequested,
    SuspiciousNoiseModelWarning,
    TrainingDivergedError,
)
from .events import ProgressEvent, StopFlag
from .ladder import LadderVAE
from .levels import LevelReport, describe_levels
from .model import HDNModel, load_model
from .noise import (
    GaussianNoiseModel,
    NoiseModel,
    NoiseModelRangeWarning,
    PoissonGaussianNoiseModel,
    load_noise_model,
)
from .prediction import PosteriorSampler, Prediction, predict, predict_in_rounds
from .training import Trainer, fine_tune, train

__all__ = [
    "LATENT_MODES",
    "OFF_MODES",
    "LevelReport",
    "DeviceError",
    "GaussianNoiseModel",
    "HDNError",
    "HDNModel",
    "HDNWarning",
    "InputError",
    "LadderVAE",
    "ModelConfig",
    "ModelFileError",
    "NoiseModel",
    "NoiseModelRangeWarning",
    "OptionError",
    "OutputError",
    "Normalisation",
    "PoissonGaussianNoiseModel",
    "PosteriorSampler",
    "Prediction",
    "ProgressEvent",
    "StopFlag",
    "StopRequested",
    "SuspiciousNoiseModelWarning",
    "Trainer",
    "TrainingConfig",
    "TrainingDivergedError",
    "available_devices",
    "describe_levels",
    "fine_tune",
    "load_model",
    "load_noise_model",
    "predict",
    "predict_in_rounds",
    "resolve_device",
    "to_frames",
    "train",
]
