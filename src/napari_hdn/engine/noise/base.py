"""The pixel noise model interface p(x | s) shared by every noise model.

A noise model works in raw intensity space: ``x`` is the observed (noisy) pixel value and ``s`` the
clean signal, both in the units of the user's data. HDN de-normalises its output before asking the
noise model, so the same noise-model file serves any normalisation.
"""

from __future__ import annotations

import math
import os
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ModelFileError
from ..files.safeio import write_file

NOISE_FILE_FORMAT = "napari-hdn-noise-model"
EXTRAPOLATION_MODES = ("linear", "clamp")
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

    @property
    def fitted_signal_range(self) -> tuple[float, float] | None:
        """Signals the model was fitted on (``None`` for models with known parameters)."""
        return None

    def range_report(self, images) -> dict:
        """How far the signals in ``images`` lie outside :attr:`fitted_signal_range`.

        See :func:`signal_range_report`; models with known parameters are valid everywhere.
        """
        return signal_range_report(self, images)

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
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"noise model parameters for kind {kind!r} are invalid: {exc}") from None


LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_pdf(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var), element-wise."""
    return -0.5 * (LOG_2PI + torch.log(var) + (x - mean) ** 2 / var)


class NoiseModelRangeWarning(UserWarning):
    """The data to restore reach far outside the signal range a noise model was fitted on."""


@dataclass(frozen=True)
class VarianceLaw:
    """The straight line ``variance = intercept + slope * s`` fitted through a noise model's variance
    inside ``[lo, hi]``, used to carry the model beyond that range.

    Shot plus read noise has a variance linear in the signal, so the line is the physics; the
    slope is kept >= 0 (camera noise does not fall as the signal rises). ``floor`` is the smallest
    variance the extension may reach; ``tau`` the distance over which the extension moves from the
    model's own variance at the edge to the line (a noisy edge value, e.g. a histogram row with
    few pairs, then neither leaks far out nor makes a jump at the edge).
    """

    intercept: float
    slope: float
    floor: float
    lo: float
    hi: float

    @property
    def tau(self) -> float:
        return 0.1 * (self.hi - self.lo)

    @classmethod
    def fit(cls, centres: torch.Tensor, variance: torch.Tensor, weights: torch.Tensor | None = None,
            floor_fraction: float = 0.01, min_floor: float = 0.0) -> VarianceLaw:
        """(Weighted) least squares through ``variance`` at signals ``centres``."""
        c, v = centres.double(), variance.double()
        w = torch.ones_like(c) if weights is None else weights.double()
        w = w / w.sum()
        cm, vm = float((w * c).sum()), float((w * v).sum())
        denom = float((w * (c - cm) ** 2).sum())
        slope = float((w * (c - cm) * (v - vm)).sum()) / denom if denom > 0 else 0.0
        slope = max(slope, 0.0)
        floor = max(floor_fraction * float(v.min()), min_floor)
        return cls(vm - slope * cm, slope, floor, float(c.min()), float(c.max()))

    def line(self, s):
        return self.intercept + self.slope * s

    def factor(self, s: torch.Tensor, v_edge: torch.Tensor) -> torch.Tensor:
        """Variance ratio ``k**2`` that carries a model beyond ``[lo, hi]``: exactly 1 inside; outside,
        the model's variance at the nearest edge, ``v_edge``, blended into the line over ``tau``."""
        # a law fitted to a diverging fit's trial state can exceed the tensor's range (seen: an
        # intercept of -3e105 while a bootstrapped GMM was being fitted): the numbers then become
        # inf/NaN, which the fitting code rejects, instead of a float conversion error
        big = torch.finfo(s.dtype).max if s.is_floating_point() else float("inf")
        a, b, floor = (max(-big, min(big, v)) for v in (self.intercept, self.slope, self.floor))
        edge = s.clamp(self.lo, self.hi)
        line_edge = torch.clamp(a + b * edge, min=floor)
        ratio = (v_edge / line_edge).clamp(min=1e-6)
        w = torch.exp(-(s - edge).abs() / self.tau)
        v = torch.clamp(a + b * s, min=floor) * ratio**w
        return v.clamp(min=floor) / v_edge


def signal_range_report(model: NoiseModel, images, max_pixels: int = 4_000_000) -> dict:
    """Compare the signal range of ``images`` with the range ``model`` was fitted on.

    The signal is estimated by a 3x3 mean of each frame (which cuts the noise threefold); its 0.5
    and 99.5 percentiles are compared with the fitted range. Returns a dict with ``level``
    (``"ok"``, ``"note"``: outside the range but within one range width of it, where extrapolating
    the fitted variance law is sound; ``"warning"``: further out, or below the level where the
    extrapolated variance reaches its floor), ``data_range``, ``fitted_range``, ``below`` /
    ``above`` (distance outside, in range widths) and a ``message``.
    """
    import numpy as np
    from scipy.ndimage import uniform_filter

    rng = model.fitted_signal_range
    if rng is None:  # known parameters: valid for any signal
        return {"level": "ok", "data_range": None, "fitted_range": None, "below": 0.0,
                "above": 0.0, "message": ""}
    arr = np.asarray(images, dtype=np.float32) if not isinstance(images, (list, tuple)) else None
    frames = list(images) if arr is None else list(arr.reshape(-1, *arr.shape[-2:]))
    total = sum(int(np.prod(np.shape(f))) for f in frames)  # Frames are not read for this
    step = max(1, int(np.ceil(total / max_pixels)))
    vals = np.concatenate([uniform_filter(np.asarray(f, np.float32), 3).ravel()
                           for f in frames[::step] or frames[:1]])
    d_lo, d_hi = (float(v) for v in np.percentile(vals, [0.5, 99.5]))
    out = {"level": "ok", "data_range": [d_lo, d_hi], "fitted_range": list(rng),
           "below": 0.0, "above": 0.0, "message": ""}
    lo, hi = rng
    width = hi - lo
    below, above = max(0.0, (lo - d_lo) / width), max(0.0, (d_hi - hi) / width)
    out.update(below=below, above=above)
    if below == 0 and above == 0:
        return out
    with torch.no_grad():
        probe = torch.tensor([d_lo, lo, hi, d_hi], dtype=torch.float32)
        sd = model.moments(probe)[1].tolist()
    floored = bool(getattr(model, "extrapolation", "linear") == "linear" and below > 0
                   and _at_floor(model, d_lo))
    parts = []
    if below > 0:
        parts.append(f"down to {d_lo:.4g} ({below:.0%} of the range width below it; noise std "
                     f"{sd[0]:.3g} there against {sd[1]:.3g} at {lo:.4g})")
    if above > 0:
        parts.append(f"up to {d_hi:.4g} ({above:.0%} of the width above it; noise std {sd[3]:.3g} "
                     f"there against {sd[2]:.3g} at {hi:.4g})")
    how = ("extrapolated along the fitted law (variance linear in the signal)"
           if getattr(model, "extrapolation", "linear") == "linear"
           else "held at the edge values (extrapolation='clamp')")
    msg = (f"the data reach outside the signal range the noise model was fitted on "
           f"({lo:.4g}-{hi:.4g}): " + "; ".join(parts) + f". The noise there is {how}.")
    if max(below, above) > 1.0 or floored:
        out["level"] = "warning"
        msg += (" That is far outside what the fit can vouch for"
                + (" (the extrapolated variance reaches its floor)" if floored else "")
                + ": fit the noise model on calibration data that covers the sample's dimmest "
                "and brightest signals, or bootstrap it from this data.")
    else:
        out["level"] = "note"
    out["message"] = msg
    return out


def _at_floor(model, signal: float) -> bool:
    law = getattr(model, "variance_law", None)
    if law is None:
        return False
    law = law()
    return law.line(signal) <= law.floor
