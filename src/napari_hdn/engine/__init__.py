"""The headless HDN engine: no Qt, no napari. Importable on any server.

Its rooms, each importing only the ground and the rooms before it in this list:

- the ground, modules at this level: ``errors``, ``config`` (architecture and training settings),
  ``options`` (the one table of numeric option bounds), ``events`` (progress and stop),
  ``threads``, ``device``, ``heap``, ``metrics``;
- ``files``: model and noise-model files written atomically and read safely, output locks;
- ``data``: arrays checked and normalised, frames read on demand, channel layouts, TIFF/OME-Zarr;
- ``noise``: pixel noise models, their fitting and diagnostics;
- ``network``: the ladder VAE, the model a file holds, loading model files and BMZ packages;
- ``prediction``: posterior sampling, MMSE and variance, latent levels, chunked prediction;
- ``training``: the Trainer, checkpoints, DDP, presets, the bundled prior, multi-channel runs;
- ``bmz``: BioImage Model Zoo export (its architecture class is what exported packages name).

The one import that runs back up is a convenience: ``HDNModel.predict`` / ``.sampler`` (and
``MultiChannelModel.predict``) call the prediction room from inside those methods.
"""

from .config import LATENT_MODES, OFF_MODES, ModelConfig, TrainingConfig
from .data.arrays import Normalisation, to_frames
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
from .events import EventKind, EventTask, ProgressEvent, StopFlag
from .network.ladder import LadderVAE
from .network.loading import load_model
from .network.model import HDNModel
from .noise import (
    GaussianNoiseModel,
    NoiseModel,
    NoiseModelRangeWarning,
    PoissonGaussianNoiseModel,
    load_noise_model,
)
from .prediction.levels import LevelReport, describe_levels
from .prediction.run import predict, predict_in_rounds
from .prediction.sampling import PosteriorSampler, Prediction
from .training.run import fine_tune, train
from .training.trainer import Trainer

__all__ = [
    "LATENT_MODES",
    "OFF_MODES",
    "LevelReport",
    "DeviceError",
    "EventKind",
    "EventTask",
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
