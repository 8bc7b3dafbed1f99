"""Signal-dependent Gaussian mixture noise model (as in PPN2V), with a data-driven variance floor.

For a clean signal ``s`` the observation ``x`` follows a mixture of ``K`` Gaussians whose weights,
means and variances are smooth functions of the normalised signal ``u = (s - lo) / (hi - lo)``
(``[lo, hi]`` is the signal range the model was fitted on):

- weights: softmax over ``K`` logits, each a polynomial of degree ``D`` in ``t = 2u - 1``;
- means: ``s + delta_k(u) - sum_j w_j delta_j(u)``, ``delta_k`` a polynomial in ``t`` (times a data
  scale), re-centred so that the mixture mean is exactly ``s``;
- variances: ``min_variance + scale**2 * sum_j exp(theta_kj) B_jD(u)`` with ``B_jD`` the Bernstein
  basis of degree ``D``. Positive coefficients keep the variance positive on the whole range and, for
  ``D = 1``, span exactly the positive linear functions of ``s`` (Poisson-Gaussian noise has a
  variance linear in the signal).

``min_variance`` is a numerical floor chosen from the data when fitting (a small fraction of the
smallest variance seen in any signal bin), not a fixed constant: a floor above the camera's read
noise biases the background noise upwards.

Outside ``[lo, hi]`` the mixture keeps the shape it has at the nearest edge (weights, and offsets
and variances relative to the total variance), and its total variance continues along the
least-squares line through the model's variance inside the range (``extrapolation="linear"``, the
default): shot plus read noise has a variance linear in the signal, and calibration scenes rarely
span the sample's dim background and bright spots. The polynomials themselves are not
extrapolated (a degree-3 polynomial far out is arbitrary). ``extrapolation="clamp"`` holds the
edge values instead.

The parameters are buffers, not ``nn.Parameter`` s, so that an optimiser over an HDN's parameters
never changes a fitted noise model; fitting (``fitting.py``) optimises a separate copy.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..options import MAX_VALUE, bounds
from .base import (
    EXTRAPOLATION_MODES,
    LOG_2PI,
    NoiseModel,
    VarianceLaw,
    register_noise_model,
)


def _poly(t: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Evaluate K polynomials (coef: (K, D+1), lowest power first) at t: (..., K), by Horner."""
    out = coef[:, -1].expand(*t.shape, coef.shape[0])
    t = t.unsqueeze(-1)
    for j in range(coef.shape[1] - 2, -1, -1):
        out = out * t + coef[:, j]
    return out


def _bernstein_poly(u: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Evaluate K Bernstein polynomials (coef: (K, D+1)) at u in [0, 1]: (..., K)."""
    degree = coef.shape[1] - 1
    if degree == 0:
        return coef[:, 0].expand(*u.shape, coef.shape[0])
    u = u.unsqueeze(-1)
    v = 1.0 - u
    out = None
    for j in range(degree + 1):
        term = coef[:, j] * (math.comb(degree, j) * u**j * v ** (degree - j))
        out = term if out is None else out + term
    return out


@register_noise_model
class GMMNoiseModel(NoiseModel):
    """Gaussian mixture p(x | s) with signal-dependent weights, offsets and variances.

    Parameters
    ----------
    signal_range : (float, float)
        Signals ``lo < hi`` the model was fitted on; see ``extrapolation`` for outside it.
    n_gaussians : int
        Number of mixture components ``K`` (default 3).
    degree : int
        Polynomial degree ``D`` of every parameter in the signal (default 1).
    min_variance : float
        Variance floor added to every component (raw intensity units squared).
    scale : float
        A typical noise std of the data; offsets and variances are stored relative to it so that
        the parameters are of order one (this matters for the optimiser, not for the model).
    theta : torch.Tensor, optional
        ``(3, K, D+1)`` coefficients: weight logits, mean offsets, log Bernstein coefficients of
        the variance. Default: equal weights, no offsets, variance ``scale**2``.
    info : dict, optional
        JSON-able fit information and diagnostics (saved with the model; see ``describe``).
    extrapolation : {"linear", "clamp"}
        Outside ``signal_range``: continue the variance along the fitted linear law (default) or
        hold the edge values.
    """

    kind = "gmm"

    def __init__(
        self,
        signal_range: tuple[float, float],
        n_gaussians: int = 3,
        degree: int = 1,
        min_variance: float = 1e-3,
        scale: float = 1.0,
        theta: torch.Tensor | None = None,
        info: dict | None = None,
        extrapolation: str = "linear",
    ):
        super().__init__()
        if extrapolation not in EXTRAPOLATION_MODES:
            raise InputError(f"extrapolation must be one of {EXTRAPOLATION_MODES}, got {extrapolation!r}")
        self.extrapolation = extrapolation
        self._law_cache: tuple | None = None
        lo, hi = (float(v) for v in signal_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise InputError(f"signal_range must be two finite numbers lo < hi, got {signal_range}")
        if max(abs(lo), abs(hi)) > MAX_VALUE:
            raise InputError(f"signal_range must lie within +-{MAX_VALUE:g} (what float32 can "
                             f"square), got {signal_range}")
        n_gaussians, degree = int(n_gaussians), int(degree)
        for name, v in (("n_gaussians", n_gaussians), ("degree", degree)):
            least, most = bounds(name)
            if not least <= v <= most:
                raise InputError(f"{name} must be between {least} and {most}, got {v}")
        min_variance, scale = float(min_variance), float(scale)
        if not (0 < min_variance <= MAX_VALUE**2):
            raise InputError(f"min_variance must be a positive number of at most "
                             f"{MAX_VALUE**2:g}, got {min_variance}")
        if not (0 < scale <= MAX_VALUE):
            raise InputError(f"scale must be a positive number of at most {MAX_VALUE:g}, got "
                             f"{scale}")
        self.signal_range = (lo, hi)
        self.n_gaussians, self.degree = n_gaussians, degree
        self.min_variance, self.scale = min_variance, scale
        shape = (3, n_gaussians, degree + 1)
        if theta is None:
            theta = torch.zeros(shape)
        theta = torch.as_tensor(theta, dtype=torch.float32).detach().clone()
        if tuple(theta.shape) != shape:
            raise InputError(f"theta must have shape {shape}, got {tuple(theta.shape)}")
        if not torch.isfinite(theta).all():
            raise InputError("theta contains NaN or infinite values")
        self.register_buffer("theta", theta)
        self.info = dict(info or {})

    @property
    def fitted_signal_range(self) -> tuple[float, float]:
        return self.signal_range

    # -- the mixture ---------------------------------------------------------------------------
    def _inside(self, s: torch.Tensor, theta: torch.Tensor):
        """Components at ``s`` clamped to the fitted range."""
        theta = theta.to(device=s.device, dtype=s.dtype if s.is_floating_point() else torch.float32)
        lo, hi = self.signal_range
        u = ((s - lo) / (hi - lo)).clamp(0.0, 1.0)
        t = 2.0 * u - 1.0
        log_w = torch.log_softmax(_poly(t, theta[0]), dim=-1)  # (..., K)
        delta = _poly(t, theta[1] * self.scale)
        delta = delta - (log_w.exp() * delta).sum(-1, keepdim=True)
        var = self.min_variance + _bernstein_poly(u, theta[2].exp() * self.scale**2)
        return log_w, delta, var

    def variance_law(self) -> VarianceLaw:
        """The line through the mixture's total variance inside the fitted range (floor: 1% of the
        smallest variance there, at least ``min_variance``)."""
        key = (self.theta._version, self.theta.data_ptr())
        if self._law_cache is None or self._law_cache[0] != key:
            lo, hi = self.signal_range
            grid = torch.linspace(lo, hi, 65, dtype=torch.float64)
            with torch.no_grad():
                log_w, delta, var = self._inside(grid, self.theta.cpu())
                v = (log_w.exp() * (var + delta * delta)).sum(-1)
            self._law_cache = (key, VarianceLaw.fit(grid, v, min_floor=self.min_variance))
        return self._law_cache[1]

    def components(self, s: torch.Tensor, theta: torch.Tensor | None = None):
        """Per-component ``(log_weight, mean_offset, variance)``, each of shape ``(*s.shape, K)``.

        ``mean_offset`` is ``mean_k - s`` (already re-centred: weighted sum zero). ``theta`` lets the
        fitting code evaluate trial parameters without touching the buffer; fitting only asks
        inside the fitted range, so trial parameters are not extrapolated.
        """
        if theta is not None or self.extrapolation == "clamp":
            return self._inside(s, self.theta if theta is None else theta)
        log_w, delta, var = self._inside(s, self.theta)
        v_edge = (log_w.exp() * (var + delta * delta)).sum(-1)
        k2 = self.variance_law().factor(s, v_edge).unsqueeze(-1)
        return log_w, delta * k2.sqrt(), var * k2

    def log_likelihood(self, x, s, theta: torch.Tensor | None = None):
        x, s = torch.broadcast_tensors(x, s)
        log_w, delta, var = self.components(s, theta)
        # residual first: x and s may be large (e.g. 16-bit data) and close to each other
        r = (x - s).unsqueeze(-1) - delta
        comp = log_w - 0.5 * (LOG_2PI + torch.log(var) + r * r / var)
        return torch.logsumexp(comp, dim=-1)

    def sample(self, s, generator=None):
        log_w, delta, var = self.components(s)
        u = torch.rand(s.shape, generator=generator, dtype=var.dtype, device=s.device)
        cdf = log_w.exp().cumsum(-1)
        k = (u.unsqueeze(-1) > cdf[..., :-1]).sum(-1, keepdim=True)
        mu = s + torch.gather(delta, -1, k).squeeze(-1)
        sd = torch.gather(var, -1, k).squeeze(-1).sqrt()
        return mu + sd * torch.randn(s.shape, generator=generator, dtype=var.dtype, device=s.device)

    def moments(self, s):
        log_w, delta, var = self.components(s)
        w = log_w.exp()
        return s, ((w * (var + delta * delta)).sum(-1)).sqrt()

    # -- state ---------------------------------------------------------------------------------
    def get_state(self):
        params = {
            "signal_range": list(self.signal_range),
            "n_gaussians": self.n_gaussians,
            "degree": self.degree,
            "min_variance": self.min_variance,
            "scale": self.scale,
            "info": self.info,
            "extrapolation": self.extrapolation,
        }
        return params, {"theta": self.theta}

    @classmethod
    def from_state(cls, params, tensors):
        return cls(
            params["signal_range"],
            params["n_gaussians"],
            params["degree"],
            params["min_variance"],
            params["scale"],
            theta=tensors["theta"],
            info=params.get("info", {}),
            # files written before extrapolation existed held the edge values; they get the
            # linear law too (the physics), which is what their users needed
            extrapolation=params.get("extrapolation", "linear"),
        )

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "n_gaussians": self.n_gaussians,
            "degree": self.degree,
            "signal_range": list(self.signal_range),
            "min_variance": self.min_variance,
            "extrapolation": self.extrapolation,
            **self.info,
        }

    def __repr__(self):
        lo, hi = self.signal_range
        return (
            f"GMMNoiseModel(n_gaussians={self.n_gaussians}, degree={self.degree}, "
            f"signal_range=({lo:g}, {hi:g}), min_variance={self.min_variance:.3g})"
        )
