"""One trained HDN per channel of a multi-channel image, saved as one file (the paper trains one
per channel; why: docs/real-data.md, "Channels"). Prediction restores every channel and returns
the input's layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..data.layout import Layout
from ..errors import InputError, ModelFileError
from ..files.safeio import write_file
from ..noise.channels import CHANNEL_FILE_VERSION, ChannelNoiseModels
from .model import MODEL_FILE_FORMAT, HDNModel, _package_version, model_from_parts


class MultiChannelModel:
    """One trained HDN per channel of a multi-channel image, saved as one file.

    Parameters
    ----------
    models : list of HDNModel
        One per channel, in channel order, all with the same number of latent levels.
    info : dict, optional
        The record of the training (``axes`` with C, ``channel_names``...).
    """

    def __init__(self, models: Sequence, info: dict | None = None) -> None:
        models = list(models)
        if len(models) < 2 or not all(isinstance(m, HDNModel) for m in models):
            raise InputError("a MultiChannelModel holds one HDNModel per channel (two or more)")
        if len({m.levels for m in models}) != 1:
            raise InputError("the channels' models must have the same number of latent levels")
        self.models = models
        self.info = dict(info or {})

    # what the single-channel model offers, for code that only needs the architecture
    @property
    def channels(self) -> int:
        return len(self.models)

    @property
    def config(self):
        return self.models[0].config

    @property
    def levels(self) -> int:
        return self.models[0].levels

    @property
    def device(self):
        return self.models[0].device

    @property
    def noise_models(self) -> ChannelNoiseModels:
        return ChannelNoiseModels([m.noise_model for m in self.models])

    def channel(self, k: int):
        """The :class:`~.model.HDNModel` of channel ``k`` (0-based)."""
        if not 0 <= int(k) < self.channels:
            raise InputError(f"channel {k} does not exist: this model has {self.channels} channels "
                             f"(0..{self.channels - 1})")
        return self.models[int(k)]

    def to(self, device) -> MultiChannelModel:
        for m in self.models:
            m.to(device)
        return self

    def resolve_modes(self, modes) -> list[str]:
        out = None
        for m in self.models:
            out = m.resolve_modes(modes)
        return out

    def default_modes(self) -> list[str]:
        return self.models[0].default_modes()

    def predict(self, image, n_samples="auto", **kwargs):
        """Samples, MMSE and variance of every channel; see :func:`napari_hdn.predict`."""
        from ..prediction.run import predict  # the convenience reaches up, as HDNModel's

        return predict(self, image, n_samples=n_samples, **kwargs)

    # -- files ---------------------------------------------------------------------------------
    def file_contents(self) -> tuple[dict, dict]:
        tensors, channels = {}, []
        for k, m in enumerate(self.models):
            t, meta = m.file_contents()
            tensors.update({f"c{k}.{name}": v for name, v in t.items()})
            channels.append({key: meta[key] for key in ("config", "noise_model", "normalisation",
                                                        "info")})
        meta = {"format": MODEL_FILE_FORMAT, "format_version": CHANNEL_FILE_VERSION,
                "napari_hdn_version": _package_version(), "channels": channels,
                "info": self.info,
                # what a reader of one channel needs to know without parsing the channels
                "config": channels[0]["config"]}
        return tensors, meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write every channel's model to one file (model format version 2), atomically."""
        tensors, meta = self.file_contents()
        return write_file(path, tensors, meta)

    def __repr__(self) -> str:
        c = self.config
        return (f"MultiChannelModel({self.channels} channels, levels={c.levels}, z_dim={c.z_dim}, "
                f"filters={c.filters}, blocks={c.blocks})")


def models_from_file(meta: dict, tensors: dict, path) -> MultiChannelModel:
    """The channels of a version-2 model file (see :func:`~.model.load_model`)."""
    channels = meta.get("channels")
    if not isinstance(channels, list) or len(channels) < 2:
        raise ModelFileError(f"{path}: the model file says it holds channels but lists "
                             f"{len(channels) if isinstance(channels, list) else 'none'}; the file "
                             "is damaged or edited")
    models = []
    for k, part in enumerate(channels):
        if not isinstance(part, dict):
            raise ModelFileError(f"{path}: the model of channel {k + 1} is invalid")
        prefix = f"c{k}."
        models.append(model_from_parts(part, {n[len(prefix):]: v for n, v in tensors.items()
                                              if n.startswith(prefix)}, path))
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return MultiChannelModel(models, info)


def check_channels(model, layout: Layout, name: str = "the image") -> None:
    """Refuse an image whose channel count is not the model's, naming both."""
    want = model.channels if isinstance(model, MultiChannelModel) else 1
    have = layout.channels if layout.has_channels else 1
    if want == have:
        return
    if want == 1:
        raise InputError(
            f"the model was trained on one channel, but {name} has {have} channels (axes "
            f"{layout.axes}): predict one channel at a time (select it first), or train a model "
            "on all channels (train with these axes)")
    trained = model.info.get("axes")
    raise InputError(
        f"the model was trained on {want} channels" + (f" (axes {trained})" if trained else "")
        + f", but {name} has {have} channel(s)" + (f" (axes {layout.axes})" if layout.has_channels
                                                    else "")
        + f": give an image with {want} channels and its channel axis C in the axes (e.g. CYX, "
        "or YXC for RGB), or predict one channel with model.channel(k)")
