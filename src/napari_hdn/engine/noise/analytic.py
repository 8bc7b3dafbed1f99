"""Noise models with known parameters: Gaussian and Poisson-Gaussian."""

from __future__ import annotations

import torch

from ..options import check_option, check_options
from .base import NoiseModel, gaussian_log_pdf, register_noise_model


@register_noise_model
class GaussianNoiseModel(NoiseModel):
    """Additive Gaussian noise of known standard deviation: x ~ N(s, sigma^2)."""

    kind = "gaussian"

    def __init__(self, sigma: float):
        super().__init__()
        sigma = check_option("sigma", sigma)
        self.sigma = sigma

    def log_likelihood(self, x, s):
        var = torch.full_like(s, self.sigma**2)
        return gaussian_log_pdf(x, s, var)

    def sample(self, s, generator=None):
        return s + self.sigma * torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)

    def moments(self, s):
        return s, torch.full_like(s, self.sigma)

    def get_state(self):
        return {"sigma": self.sigma}, {}

    @classmethod
    def from_state(cls, params, tensors):
        return cls(params["sigma"])

    def __repr__(self):
        return f"GaussianNoiseModel(sigma={self.sigma:g})"


@register_noise_model
class PoissonGaussianNoiseModel(NoiseModel):
    """Shot noise plus camera read noise with known gain, read-noise std and offset.

    Observation model: ``x = gain * Poisson((s - offset) / gain) + offset + N(0, read_noise^2)``.
    The likelihood uses the usual Gaussian approximation with signal-dependent variance
    ``gain * max(s - offset, 0) + read_noise^2``, which is accurate above a few photons and,
    unlike the exact mixture, differentiable in ``s``.
    """

    kind = "poisson-gaussian"

    def __init__(self, gain: float, read_noise: float, offset: float = 0.0):
        super().__init__()
        c = check_options(gain=gain, read_noise=read_noise, offset=offset)
        gain, read_noise, offset = c["gain"], c["read_noise"], c["offset"]
        self.gain, self.read_noise, self.offset = gain, read_noise, offset

    def _var(self, s):
        # A small floor keeps the log finite where read noise is 0 and the signal is at the offset.
        floor = max(self.read_noise**2, 1e-3 * self.gain**2)
        return self.gain * torch.clamp(s - self.offset, min=0.0) + floor

    def log_likelihood(self, x, s):
        return gaussian_log_pdf(x, s, self._var(s))

    def sample(self, s, generator=None):
        rate = torch.clamp((s - self.offset) / self.gain, min=0.0)
        shot = torch.poisson(rate, generator=generator) * self.gain
        read = self.read_noise * torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
        return shot + self.offset + read

    def moments(self, s):
        return s, torch.sqrt(self._var(s))

    def get_state(self):
        return {"gain": self.gain, "read_noise": self.read_noise, "offset": self.offset}, {}

    @classmethod
    def from_state(cls, params, tensors):
        return cls(params["gain"], params["read_noise"], params.get("offset", 0.0))

    def __repr__(self):
        return (
            f"PoissonGaussianNoiseModel(gain={self.gain:g}, read_noise={self.read_noise:g}, "
            f"offset={self.offset:g})"
        )
