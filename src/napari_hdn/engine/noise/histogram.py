"""Histogram noise model: an empirical p(x | s) from a 2D histogram of (signal, x - s).

Rows are signal bins, columns bins of the observation's offset from the signal, ``r = x - s``.
Binning the offset rather than ``x`` itself keeps each row sharp: inside one signal bin the signal
still varies, and a histogram of raw ``x`` would add that spread (about bin width / sqrt(12)) to the
noise. The density is interpolated linearly between bin centres along both axes, so
``log_likelihood`` is continuous and differentiable in ``s`` (through both the row and the offset).

- Each row is normalised to a density in ``r`` and carries a small floor (a pseudo-count), so that an
  offset never seen in the fitting data has a small but finite likelihood.
- Empty or sparse rows (fewer than ``min_row_count`` pairs) are filled by linear interpolation
  between the nearest well-populated rows (constant beyond the outermost ones).
- Offsets beyond the histogram's range get the row's floor density times a Gaussian tail
  ``exp(-d^2 / (2 std_row^2))``, ``d`` the distance to the range.
- Signals beyond the first or last row centre use that row's distribution, scaled so that its
  variance follows the least-squares line through the rows' variances (``extrapolation="linear"``,
  the default: shot plus read noise has a variance linear in the signal); ``"clamp"`` uses the
  edge row unscaled.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError
from ..options import MAX_VALUE
from .base import EXTRAPOLATION_MODES, NoiseModel, VarianceLaw, register_noise_model


@register_noise_model
class HistogramNoiseModel(NoiseModel):
    """Empirical noise model: row-normalised 2D histogram of (signal bin, offset bin).

    Build one with :meth:`from_pairs` (or ``fit_noise_model(..., kind="histogram")``).

    Parameters
    ----------
    signal_range : (float, float)
        Range ``[lo, hi]`` covered by the signal bins (equal width).
    offset_range : (float, float)
        Range of ``x - s`` covered by the offset bins (equal width).
    density : torch.Tensor
        ``(n_signal_bins, n_offset_bins)`` densities in ``1 / intensity`` (each row sums to
        ``1 / bin_width``), strictly positive.
    row_std : torch.Tensor
        ``(n_signal_bins,)`` std of the offset in each row, used for the tails beyond the range.
    info : dict, optional
        JSON-able fit information and diagnostics.
    extrapolation : {"linear", "clamp"}
        Beyond the outer well-populated rows: scale the edge row so that the variance follows the
        fitted linear law (default), or use the edge row as it is.
    row_count : torch.Tensor, optional
        ``(n_signal_bins,)`` pairs behind each row (0 for rows filled from their neighbours). The
        variance law is fitted on the rows weighted by it, and extrapolation starts at the outermost
        rows with data. Without it every row counts alike.
    """

    kind = "histogram"

    def __init__(self, signal_range, offset_range, density, row_std, info: dict | None = None,
                 extrapolation: str = "linear", row_count=None):
        super().__init__()
        if extrapolation not in EXTRAPOLATION_MODES:
            raise InputError(f"extrapolation must be one of {EXTRAPOLATION_MODES}, got {extrapolation!r}")
        self.extrapolation = extrapolation
        lo, hi = (float(v) for v in signal_range)
        rlo, rhi = (float(v) for v in offset_range)
        for a, b, what in ((lo, hi, "signal_range"), (rlo, rhi, "offset_range")):
            if not (math.isfinite(a) and math.isfinite(b) and b > a):
                raise InputError(f"{what} must be two finite numbers lo < hi, got {(a, b)}")
            if max(abs(a), abs(b)) > MAX_VALUE:
                raise InputError(f"{what} must lie within +-{MAX_VALUE:g} (what float32 can "
                                 f"square), got {(a, b)}")
        density = torch.as_tensor(density, dtype=torch.float32).detach().clone()
        row_std = torch.as_tensor(row_std, dtype=torch.float32).detach().clone()
        if density.ndim != 2 or density.shape[1] < 2:
            raise InputError(f"density must be 2D with at least 2 offset bins, got {tuple(density.shape)}")
        if tuple(row_std.shape) != (density.shape[0],):
            raise InputError("row_std must have one value per signal bin")
        if not (torch.isfinite(density).all() and (density > 0).all()):
            raise InputError("density must be finite and strictly positive")
        if not (torch.isfinite(row_std).all() and (row_std > 0).all()):
            raise InputError("row_std must be finite and strictly positive")
        self.signal_range, self.offset_range = (lo, hi), (rlo, rhi)
        self.register_buffer("density", density)
        self.register_buffer("row_std", row_std)
        if row_count is None:
            row_count = torch.ones(density.shape[0])
        row_count = torch.as_tensor(row_count, dtype=torch.float32).detach().clone()
        if tuple(row_count.shape) != (density.shape[0],) or not (row_count >= 0).all():
            raise InputError("row_count must hold one non-negative count per signal bin")
        if not (row_count > 0).any():
            raise InputError("row_count must be positive for at least one signal bin")
        self.register_buffer("row_count", row_count)
        self.info = dict(info or {})
        self._row_moments()

    @property
    def n_signal_bins(self) -> int:
        return int(self.density.shape[0])

    @property
    def n_offset_bins(self) -> int:
        return int(self.density.shape[1])

    @property
    def offset_bin_width(self) -> float:
        return (self.offset_range[1] - self.offset_range[0]) / self.n_offset_bins

    def offset_centres(self) -> torch.Tensor:
        rlo, dr = self.offset_range[0], self.offset_bin_width
        return rlo + dr * (torch.arange(self.n_offset_bins, dtype=torch.float64) + 0.5)

    def _row_moments(self) -> None:
        # Linear interpolation between bin centres = point masses convolved with a triangle of
        # half-width dr, whose variance dr^2 / 6 adds to the grouped variance.
        p = self.density.double()
        p = p / p.sum(1, keepdim=True)
        c = self.offset_centres()
        mean = (p * c).sum(1)
        var = (p * (c - mean[:, None]) ** 2).sum(1) + self.offset_bin_width**2 / 6.0
        self.register_buffer("row_mean", mean.float(), persistent=False)
        self.register_buffer("row_var", var.float(), persistent=False)
        # the total variance of each row (offset mean included), for the linear extrapolation
        # the variance law: weighted least squares over the rows with data; extrapolation starts at
        # the outermost of them (rows beyond are copies of their neighbour)
        have = self.row_count > 0
        self._law = VarianceLaw.fit(self._row_centres()[have], var[have], self.row_count[have])

    def _row_centres(self) -> torch.Tensor:
        lo, hi = self.signal_range
        w = (hi - lo) / self.n_signal_bins
        return lo + w * (torch.arange(self.n_signal_bins, dtype=torch.float64) + 0.5)

    @property
    def fitted_signal_range(self) -> tuple[float, float]:
        return self.signal_range

    def variance_law(self) -> VarianceLaw:
        """The line through the rows' offset variance (rows with data, weighted by their pairs)."""
        return self._law

    def _scale(self, s: torch.Tensor) -> torch.Tensor:
        """Factor ``k`` (1 between the outer row centres) by which offsets are stretched."""
        if self.extrapolation == "clamp":
            return torch.ones_like(s)
        i0, a = self._rows(s)
        v = self.row_var.to(s.device, s.dtype if s.is_floating_point() else torch.float32)
        v_edge = ((1 - a) * v[i0] + a * v[(i0 + 1).clamp(max=self.n_signal_bins - 1)]).detach()
        return self._law.factor(s, v_edge).sqrt()

    # -- evaluation ----------------------------------------------------------------------------
    def _rows(self, s: torch.Tensor):
        """Lower row index and interpolation weight of each signal (differentiable weight)."""
        lo, hi = self.signal_range
        n = self.n_signal_bins
        f = ((s - lo) / ((hi - lo) / n) - 0.5).clamp(0.0, n - 1.0)
        i0 = f.detach().floor().clamp(max=max(n - 2, 0))
        return i0.long(), f - i0

    def log_likelihood(self, x, s):
        x, s = torch.broadcast_tensors(x, s)
        dens = self.density.to(s.device)
        if s.is_floating_point() and dens.dtype != s.dtype:
            dens = dens.to(s.dtype)
        std = self.row_std.to(device=s.device, dtype=dens.dtype)
        ns, nr = dens.shape
        rlo, rhi = self.offset_range
        dr = self.offset_bin_width
        i0, a = self._rows(s)
        i1 = (i0 + 1).clamp(max=ns - 1)
        k = self._scale(s)
        r = (x - s) / k
        g = ((r - rlo) / dr - 0.5).clamp(0.0, nr - 1.0)
        j0 = g.detach().floor().clamp(max=nr - 2)
        b = g - j0
        j0 = j0.long()
        flat = dens.reshape(-1)

        def at(i, j):
            return flat[i * nr + j]

        p = (1 - a) * ((1 - b) * at(i0, j0) + b * at(i0, j0 + 1)) + a * (
            (1 - b) * at(i1, j0) + b * at(i1, j0 + 1)
        )
        out = torch.log(p)
        # beyond the offset range: Gaussian tail with the row's std, starting at the edge value
        d = torch.relu(rlo - r) + torch.relu(r - rhi)
        sd = (1 - a) * std[i0] + a * std[i1]
        return out - 0.5 * (d / sd) ** 2 - torch.log(k)

    def moments(self, s):
        i0, a = self._rows(s)
        i1 = (i0 + 1).clamp(max=self.n_signal_bins - 1)
        m = self.row_mean.to(s.device)
        v = self.row_var.to(s.device)
        mean = (1 - a) * m[i0] + a * m[i1]
        second = (1 - a) * (v[i0] + m[i0] ** 2) + a * (v[i1] + m[i1] ** 2)
        k = self._scale(s)
        return s + k * mean, k * (second - mean**2).clamp(min=0).sqrt()

    def sample(self, s, generator=None):
        i0, a = self._rows(s)
        i1 = (i0 + 1).clamp(max=self.n_signal_bins - 1)
        dev = s.device
        u = torch.rand(s.shape, generator=generator, device=dev)
        row = torch.where(u < a, i1, i0)
        # inverse CDF of each element's row with one searchsorted: row k's CDF is shifted to
        # (k, k + 1], so the concatenation of all rows is sorted
        f = torch.float32 if dev.type == "mps" else torch.float64  # no float64 on Apple GPUs
        cdf = self.density.to(dev, f).cumsum(1)
        cdf = cdf / cdf[:, -1:] + torch.arange(self.n_signal_bins, device=dev, dtype=f)[:, None]
        v = torch.rand(s.shape, generator=generator, device=dev, dtype=f)
        k = torch.searchsorted(cdf.reshape(-1), (row.to(f) + v).reshape(-1))
        j = (k.reshape(s.shape) - row * self.n_offset_bins).clamp(0, self.n_offset_bins - 1)
        c = self.offset_range[0] + self.offset_bin_width * (j.to(s.dtype) + 0.5)
        # the density is linear between centres: a triangle of half-width dr around each centre
        tri = torch.rand(s.shape, generator=generator, device=dev) + torch.rand(
            s.shape, generator=generator, device=dev
        ) - 1.0
        return s + self._scale(s) * (c + tri.to(s.dtype) * self.offset_bin_width)

    # -- building from data --------------------------------------------------------------------
    @classmethod
    def from_pairs(
        cls,
        signal,
        observation,
        signal_bins: int | None = None,
        offset_bins: int | None = None,
        signal_range: tuple[float, float] | None = None,
        min_row_count: int = 50,
        pseudo_count: float = 0.01,
        smoothing: float = 0.1,
    ) -> HistogramNoiseModel:
        """Build the histogram from (signal, observation) pairs.

        Parameters
        ----------
        signal, observation : array-like
            Pixel pairs (any shape, same size); validate them first (``check_pairs``).
        signal_bins : int, optional
            Number of signal rows; default one per 5000 pairs (10 to 200).
        offset_bins : int, optional
            Number of offset columns; default such that a bin is a quarter of the smallest noise
            std seen in any row (32 to 512 bins).
        signal_range : (lo, hi), optional
            Default: the range of ``signal``.
        min_row_count : int
            Rows with fewer pairs are interpolated from their neighbours.
        pseudo_count : float
            Added to every bin (the floor of the density).
        smoothing : float
            Each row is smoothed along the offset with a Gaussian kernel of this many times the
            row's noise std (default 0.1: the std grows by 0.5 %, while bin-to-bin counting noise,
            which would make the gradient in ``s`` erratic and overfit the likelihood, is damped).
            0 keeps the raw counts.
        """
        s = np.asarray(signal, dtype=np.float32).ravel()
        x = np.asarray(observation, dtype=np.float32).ravel()
        n = s.size
        lo, hi = (float(s.min()), float(s.max())) if signal_range is None else map(float, signal_range)
        if not hi > lo:
            raise InputError("the signal is constant: a histogram noise model needs a range of signals")
        ns = int(signal_bins) if signal_bins else int(np.clip(n // 5000, 10, 200))
        r = (x - s).astype(np.float32)
        row = np.clip(((s - lo) / (hi - lo) * ns).astype(np.int64), 0, ns - 1)
        cnt = np.bincount(row, minlength=ns).astype(np.float64)
        sr = np.bincount(row, weights=r, minlength=ns)
        sr2 = np.bincount(row, weights=r.astype(np.float64) ** 2, minlength=ns)
        good = cnt >= max(min_row_count, 2)
        if not good.any():
            raise InputError(
                f"no signal bin has {min_row_count} pairs: too few pairs ({n}) for a histogram "
                "noise model; use more data or fewer signal bins"
            )
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sr / cnt
            var = sr2 / cnt - mean**2
        var_good = var[good]
        if not (var_good > 0).any():
            raise InputError("the observations equal the signal everywhere: there is no noise to model")
        row_std = np.sqrt(np.clip(var, 0, None))
        min_std = float(np.sqrt(max(var_good[var_good > 0].min(), 1e-12)))
        q_lo, q_hi = np.percentile(r, [0.005, 99.995])
        margin = 0.1 * (q_hi - q_lo) + 2 * min_std
        rlo, rhi = float(q_lo - margin), float(q_hi + margin)
        if offset_bins:
            nr = int(offset_bins)
        else:
            nr = int(np.clip(np.ceil((rhi - rlo) / (0.25 * min_std)), 32, 512))
        if nr < 2:
            raise InputError("offset_bins must be at least 2")
        dr = (rhi - rlo) / nr
        col = np.floor((r - rlo) / dr).astype(np.int64)
        inside = (col >= 0) & (col < nr)
        counts = np.bincount(row[inside] * nr + col[inside], minlength=ns * nr).reshape(ns, nr)
        counts = counts.astype(np.float64)
        if smoothing > 0:
            from scipy.ndimage import gaussian_filter1d

            for i in np.flatnonzero(good):
                h = smoothing * row_std[i] / dr
                if h > 0.2:
                    counts[i] = gaussian_filter1d(counts[i], h, mode="constant", truncate=4.0)
        dens = (counts + pseudo_count) / (counts.sum(1, keepdims=True) + pseudo_count * nr) / dr
        # fill sparse rows from the nearest well-populated rows (normalised densities blend to one)
        idx = np.flatnonzero(good)
        for i in np.flatnonzero(~good):
            below, above = idx[idx < i], idx[idx > i]
            if below.size and above.size:
                b, c = below[-1], above[0]
                w = (i - b) / (c - b)
                dens[i] = (1 - w) * dens[b] + w * dens[c]
                row_std[i] = (1 - w) * row_std[b] + w * row_std[c]
            else:
                k = below[-1] if below.size else above[0]
                dens[i] = dens[k]
                row_std[i] = row_std[k]
        row_std = np.maximum(row_std, 0.5 * dr)
        info = {"filled_rows": int((~good).sum())}
        return cls((lo, hi), (rlo, rhi), torch.from_numpy(dens), torch.from_numpy(row_std),
                   info={"histogram": info}, row_count=torch.from_numpy(np.where(good, cnt, 0.0)))

    # -- state ---------------------------------------------------------------------------------
    def get_state(self):
        params = {
            "signal_range": list(self.signal_range),
            "offset_range": list(self.offset_range),
            "info": self.info,
            "extrapolation": self.extrapolation,
        }
        return params, {"density": self.density, "row_std": self.row_std, "row_count": self.row_count}

    @classmethod
    def from_state(cls, params, tensors):
        return cls(params["signal_range"], params["offset_range"], tensors["density"],
                   tensors["row_std"], info=params.get("info", {}),
                   extrapolation=params.get("extrapolation", "linear"),
                   row_count=tensors.get("row_count"))

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "signal_bins": self.n_signal_bins,
            "offset_bins": self.n_offset_bins,
            "signal_range": list(self.signal_range),
            "offset_range": list(self.offset_range),
            "extrapolation": self.extrapolation,
            **self.info,
        }

    def __repr__(self):
        lo, hi = self.signal_range
        return (
            f"HistogramNoiseModel({self.n_signal_bins}x{self.n_offset_bins} bins, "
            f"signal_range=({lo:g}, {hi:g}))"
        )
