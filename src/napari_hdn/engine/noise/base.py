"""The pixel noise model interface p(x | s) shared by every noise model.

A noise model works in raw intensity space: ``x`` is the observed (noisy) pixel value and ``s`` the
clean signal, both in the units of the user's data. HDN de-normalises its output before asking the
noise model, so the same noise-model file serves any normalisation.
"""

from __future__ import annotations

import math
import os
from abc import abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ..errors import ModelFileError
from ..safeio import read_file, write_file

NOISE_FILE_FORMAT = "napari-hdn-noise-model"
NOISE_FILE_VERSION = 1

_REGISTRY: dict[str, type[NoiseModel]] = {}


def register_noise_model(cls: type[NoiseModel]) -> type[NoiseModel]:
    """Class decorator: make a noise model kind loadable from files by its ``kind`` name."""
    _REGISTRY[cls.kind] = cls
    return cls


def noise_model_kinds() -> list[str]:
    return sorted(_REGISTRY)


class NoiseModel(nn.Module):
    """Base class of pixel noise models.

    Subclasses implement :meth:`log_likelihood`, :meth:`sample`, :meth:`moments` and the pair
    :meth:`get_state` / :meth:`from_state` used for saving (JSON parameters + tensors, no pickle).
    They are ``nn.Module`` s so that ``.to(device)`` moves them with the HDN.
    """

    kind: ClassVar[str] = "base"

    @abstractmethod
    def log_likelihood(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Element-wise log p(x | s) for tensors of the same (broadcastable) shape.

        Differentiable in ``s``; numerically stable for any real inputs.
        """

    @abstractmethod
    def sample(self, s: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one noisy observation per element of the signal ``s``."""

    @abstractmethod
    def moments(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of p(x | s) for each element of ``s``."""

    @abstractmethod
    def get_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Return ``(params, tensors)``: JSON-able parameters and named tensors."""

    @classmethod
    @abstractmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> NoiseModel:
        """Rebuild a noise model from :meth:`get_state`'s output."""

    def describe(self) -> dict:
        """A JSON-able summary (kind, parameters) for display and ``describe`` commands."""
        params, _ = self.get_state()
        return {"kind": self.kind, **params}

    def save(self, path: str | os.PathLike) -> None:
        """Write this noise model to one safetensors file (no code runs when it is loaded)."""
        params, tensors = self.get_state()
        meta = {
            "format": NOISE_FILE_FORMAT,
            "format_version": NOISE_FILE_VERSION,
            "kind": self.kind,
            "params": params,
        }
        write_file(path, tensors, meta)


def noise_model_from_state(kind: str, params: dict, tensors: dict) -> NoiseModel:
    """Instantiate a registered noise model kind from saved state."""
    if kind not in _REGISTRY:
        raise ModelFileError(
            f"unknown noise model kind {kind!r} (known: {', '.join(noise_model_kinds())}); "
            "the file may come from a newer napari-hdn."
        )
    try:
        return _REGISTRY[kind].from_state(params, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"noise model parameters for kind {kind!r} are invalid: {exc}") from None


def load_noise_model(path: str | os.PathLike) -> NoiseModel:
    """Load a noise model file written by :meth:`NoiseModel.save`.

    Raises
    ------
    ModelFileError
        If the file is missing, corrupt, not a noise-model file, or from a newer format version.
    """
    meta, tensors = read_file(path, NOISE_FILE_FORMAT, "napari-hdn noise model")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > NOISE_FILE_VERSION:
        raise ModelFileError(
            f"{path} has noise-model format version {version}, this napari-hdn reads up to "
            f"{NOISE_FILE_VERSION}: update napari-hdn."
        )
    return noise_model_from_state(meta.get("kind", "?"), meta.get("params", {}), tensors)


LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_pdf(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var), element-wise."""
    return -0.5 * (LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)
