"""One noise model per channel of a multi-channel image (fitted per channel: a camera's gain and
offset may differ between channels, and each channel's signal range does), saved as one file;
:func:`load_noise_model` reads a noise-model file of either kind."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

from ..errors import InputError, ModelFileError
from ..files.safeio import check_finite_tensors, read_file, write_file
from .base import NOISE_FILE_FORMAT, NOISE_FILE_VERSION, NoiseModel, noise_model_from_state
from .diagnostics import verdict_warning

#: the format version of model and noise-model files that hold channels
CHANNEL_FILE_VERSION = 2


class ChannelNoiseModels(Sequence):
    """One noise model per channel (a sequence of :class:`~.noise.base.NoiseModel`)."""

    kind = "per-channel"

    def __init__(self, models: Sequence) -> None:
        models = list(models)
        if not models or not all(isinstance(m, NoiseModel) for m in models):
            raise InputError("ChannelNoiseModels takes a list of noise models, one per channel")
        self.models = models

    def __getitem__(self, k):
        return self.models[k]

    def __len__(self) -> int:
        return len(self.models)

    @property
    def info(self) -> dict:
        """The verdicts of the channels' fits (``verdict`` is the worst of them)."""
        verdicts = [getattr(m, "info", {}).get("verdict") for m in self.models]
        known = [v for v in verdicts if v]
        worst = ("suspicious" if "suspicious" in known else "good") if known else None
        return {"verdict": worst, "channels": [getattr(m, "info", {}) or {} for m in self.models]}

    def save(self, path: str | os.PathLike) -> None:
        """One file with every channel's model (noise-model format version 2)."""
        tensors, states = {}, []
        for k, m in enumerate(self.models):
            params, t = m.get_state()
            tensors.update({f"c{k}.{name}": v for name, v in t.items()})
            states.append({"kind": m.kind, "params": params})
        write_file(path, tensors, {"format": NOISE_FILE_FORMAT,
                                   "format_version": CHANNEL_FILE_VERSION, "channels": states})

    def describe(self) -> dict:
        return {"kind": self.kind, "channels": [m.describe() for m in self.models]}

    def __repr__(self) -> str:
        return f"ChannelNoiseModels({', '.join(repr(m) for m in self.models)})"


def noise_models_from_file(meta: dict, tensors: dict, path) -> ChannelNoiseModels:
    """The channels of a version-2 noise-model file (see :func:`~.noise.load_noise_model`)."""
    states = meta.get("channels")
    if not isinstance(states, list) or not states:
        raise ModelFileError(f"{path}: the noise-model file says it holds channels but lists none; "
                             "the file is damaged or edited")
    out = []
    for k, st in enumerate(states):
        if not isinstance(st, dict) or not isinstance(st.get("params", {}), dict):
            raise ModelFileError(f"{path}: the noise model of channel {k + 1} is invalid")
        prefix = f"c{k}."
        out.append(noise_model_from_state(str(st.get("kind", "?")), st.get("params", {}),
                                          {n[len(prefix):]: v for n, v in tensors.items()
                                           if n.startswith(prefix)}))
    return ChannelNoiseModels(out)


def per_channel_noise(noise, channels: int) -> list:
    """A noise model for each of ``channels``: a list or :class:`ChannelNoiseModels` of that
    length, or one model (copied to every channel, e.g. a camera's known Poisson-Gaussian law)."""
    if isinstance(noise, NoiseModel):
        return [copy.deepcopy(noise) for _ in range(channels)]
    if isinstance(noise, (list, tuple, ChannelNoiseModels)):
        models = list(noise)
        if len(models) != channels:
            raise InputError(f"{len(models)} noise model(s) for an image with {channels} channels: "
                             "give one noise model per channel (fit one on each channel), or one "
                             "for all")
        return models
    raise InputError("a noise model is required: pass e.g. GaussianNoiseModel(sigma), a fitted noise "
                     "model, or one per channel (ChannelNoiseModels)")


def verdict_warnings(noise) -> str:
    """:func:`~.noise.diagnostics.verdict_warning` of every channel that has one, joined."""
    if isinstance(noise, ChannelNoiseModels):
        parts = [f"channel {k + 1}: {w}" for k, m in enumerate(noise) if (w := verdict_warning(m))]
        return "; ".join(parts)
    return verdict_warning(noise)


def load_noise_model(path: str | os.PathLike):
    """Load a noise model file written by :meth:`NoiseModel.save` (a :class:`NoiseModel`), or by
    :meth:`~napari_hdn.engine.noise.channels.ChannelNoiseModels.save` (one model per channel).

    Raises
    ------
    ModelFileError
        If the file is missing, corrupt, not a noise-model file, or from a newer format version.
    """
    meta, tensors = read_file(path, NOISE_FILE_FORMAT, "napari-hdn noise model")
    version = meta.get("format_version")
    if version == 2 and "channels" in meta:  # one noise model per channel
        check_finite_tensors(tensors, path, "noise model")
        return noise_models_from_file(meta, tensors, path)
    if not isinstance(version, int) or version > NOISE_FILE_VERSION:
        raise ModelFileError(
            f"{path} has noise-model format version {version}, this napari-hdn reads up to "
            f"{NOISE_FILE_VERSION + 1}: update napari-hdn."
        )
    params = meta.get("params", {})
    if not isinstance(params, dict):
        raise ModelFileError(f"{path}: the noise model's parameters are invalid (a "
                             f"{type(params).__name__}, not a dict); the file is damaged or edited.")
    check_finite_tensors(tensors, path, "noise model")
    return noise_model_from_state(str(meta.get("kind", "?")), params, tensors)
