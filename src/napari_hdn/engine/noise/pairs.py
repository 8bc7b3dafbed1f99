"""Where (signal, observation) pixel pairs for fitting a noise model come from.

- Calibration: a stack of noisy frames of a static sample; the signal is the mean over frames and
  every frame is paired with it.
- Clean + noisy: a clean image given by the user, paired with one or more noisy images of it.
- Pseudo-clean (bootstrap): a denoised version of the noisy data itself (another denoiser's output,
  or the built-in Noise2Void network, see ``n2v.py``), with the signal range clipped to percentiles.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

#: below this many calibration frames the mean over frames is still noticeably noisy
MIN_CALIBRATION_FRAMES = 20
#: fewer pairs than this cannot constrain even a 1-Gaussian model across a signal range
MIN_PAIRS = 1000


class NoiseFitWarning(UserWarning):
    """The pairs are usable but the fit may be unreliable (e.g. few calibration frames)."""


@dataclass
class NoisePairs:
    """Flat float32 arrays of clean signal and noisy observation, one entry per pixel.

    Attributes
    ----------
    signal, observation : np.ndarray
        1D float32 arrays of the same length.
    source : str
        ``"calibration"``, ``"clean"``, ``"pseudo-clean"``, ``"n2v"`` or ``"pairs"``.
    notes : list of str
        Warnings about the pairs (kept with the fitted model's diagnostics).
    """

    signal: np.ndarray
    observation: np.ndarray
    source: str = "pairs"
    notes: list[str] = field(default_factory=list)
    #: how the pairs were made, kept with the fit (e.g. ``{"n2v": {...}}``: the Noise2Void run)
    record: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.signal.size)


def _as_array(a, name: str) -> np.ndarray:
    from ..data.arrays import image_array

    arr = np.asarray(image_array(a, name))  # tensors, masked arrays, lists of one shape
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InputError(f"{name} has dtype {arr.dtype}; expected a numeric (integer or float) array")
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(
            f"{name} contains {int(bad.sum())} NaN or infinite pixel(s); a noise model cannot be "
            "fitted on them: replace or crop them out first"
        )
    return arr


def check_pairs(signal, observation, source: str = "pairs", notes=None) -> NoisePairs:
    """Validate and flatten arrays of signal and observation into :class:`NoisePairs`.

    Raises
    ------
    InputError
        On a shape mismatch, NaN/inf values, too few pairs, or a constant signal or observation.
    """
    s = _as_array(signal, "signal")
    x = _as_array(observation, "observation")
    if s.shape != x.shape:
        raise InputError(
            f"signal has shape {s.shape} but observation has shape {x.shape}: they must match pixel "
            "for pixel"
        )
    s, x = s.ravel(), x.ravel()
    if s.size < MIN_PAIRS:
        raise InputError(
            f"only {s.size} (signal, observation) pairs; at least {MIN_PAIRS} are needed (100,000 or "
            "more for a reliable fit): use larger images or more frames"
        )
    if float(s.max()) <= float(s.min()):
        raise InputError(
            f"the signal is constant ({float(s[0]):g}): the noise cannot be modelled as a function of "
            "the signal; use images with a range of intensities (a sample, not a flat field or a "
            "blank frame)"
        )
    if float(x.max()) <= float(x.min()):
        raise InputError(
            f"the noisy observation is constant ({float(x[0]):g}): there is no noise to model; check "
            "that the right (raw, noisy) image was given"
        )
    return NoisePairs(s, x, source, list(notes or []))


def pairs_from_calibration(frames, bias_correction: bool = True) -> NoisePairs:
    """Pairs from a stack of noisy frames of a static sample: signal = mean over frames.

    Parameters
    ----------
    frames : array (N, Y, X) or (N, ...) or list of N arrays of the same shape
        Repeated noisy acquisitions of the same static field of view (axis 0 = frame).
    bias_correction : bool
        Each frame is part of the mean it is paired with, which shrinks its deviation from the mean
        by ``sqrt((N-1)/N)``; scale the deviations back so the fitted variance is unbiased.

    Warns
    -----
    NoiseFitWarning
        When fewer than ``MIN_CALIBRATION_FRAMES`` frames are given (the mean is then itself noisy).
    """
    stack = _as_array(frames, "calibration frames")
    if stack.ndim < 3:
        raise InputError(
            f"calibration data must be a stack of frames (N, Y, X), got shape {stack.shape}; for a "
            "single noisy image use a clean image (clean + noisy) or bootstrapping instead"
        )
    n = stack.shape[0]
    if n < 2:
        raise InputError("calibration data need at least 2 frames (better 50 or more) of a static sample")
    signal = stack.mean(axis=0, dtype=np.float64).astype(np.float32)
    dev = stack - signal[None]
    if bias_correction:
        dev *= np.float32(np.sqrt(n / (n - 1.0)))
    obs = signal[None] + dev
    notes = []
    if n < MIN_CALIBRATION_FRAMES:
        msg = (
            f"only {n} calibration frames: their mean still carries noise with "
            f"{1 / np.sqrt(n):.0%} of a frame's noise std, so it is not a clean signal; use at least "
            f"{MIN_CALIBRATION_FRAMES} (ideally 100) frames"
        )
        warnings.warn(msg, NoiseFitWarning, stacklevel=2)
        notes.append(msg)
    drift = stationarity_report(stack)
    if drift["stationary"] is False:
        warnings.warn(drift["message"], NoiseFitWarning, stacklevel=2)
        notes.append(drift["message"])
    sig = np.broadcast_to(signal[None], stack.shape)
    return check_pairs(sig, obs, "calibration", notes)


#: the calibration stack is called non-stationary when its change over time adds this fraction
#: (or more) to the noise variance it seems to show (5 %: the noise std then reads 2.5 % high)
DRIFT_VARIANCE_FRACTION = 0.05


def stationarity_report(stack) -> dict:
    """Does a calibration stack (N, ...) change over time (bleaching, drift, focus)?

    A static sample's frames differ by noise only: the per-pixel difference between the mean of the
    second half of the frames and the mean of the first half then has the variance that the noise
    alone gives, ``var * (1/n1 + 1/n2)``. Any change of the sample over time adds to it; a linear
    trend whose half means differ by ``d`` adds ``d**2 / 3`` to the variance the fit would see (the
    trend is mistaken for noise). Returns ``stationary`` (None with fewer than 4 frames),
    ``inflation`` (that added variance as a fraction of the apparent noise variance), the frame
    means at the start and the end, and a ``message``.
    """
    flat = np.asarray(stack).reshape(np.shape(stack)[0], -1)
    step = max(1, flat.shape[1] // 250_000)  # a regular subset of pixels keeps memory small
    x = flat[:, ::step].astype(np.float64)
    n = x.shape[0]
    out = {"stationary": None, "inflation": 0.0, "message": ""}
    if n < 4:
        return out
    n1 = n // 2
    d = x[n - n1:].mean(0) - x[:n1].mean(0)
    var = x.var(0, ddof=1)
    mean_var = float(var.mean())
    if not mean_var > 0:
        return out
    excess = float((d**2).mean()) - mean_var * (2.0 / n1)
    inflation = max(0.0, excess / 3.0) / mean_var
    means = x.mean(1)
    k = max(1, n // 10)
    first, last = float(means[:k].mean()), float(means[-k:].mean())
    out.update(stationary=inflation < DRIFT_VARIANCE_FRACTION, inflation=inflation,
               first_mean=first, last_mean=last)
    if not out["stationary"]:
        std_high = np.sqrt(1.0 / max(1e-12, 1.0 - inflation)) - 1.0 if inflation < 1 else None
        how = f"reads about {std_high:.0%} too high" if std_high is not None else \
            "is mostly the change, not noise"
        out["message"] = (
            f"the calibration frames are not stationary: the sample changes over the stack (frame "
            f"mean {first:.4g} at the start, {last:.4g} at the end; the second half of the frames "
            f"differs from the first by {np.sqrt(max(excess, 0.0)):.3g} per pixel, root mean "
            f"square, beyond the noise), so the fitted noise {how}. Bleaching or drift? Use frames "
            "of a static sample, fewer frames taken quickly, or correct the drift first"
        )
    return out


def pairs_from_clean(clean, noisy) -> NoisePairs:
    """Pairs from a clean image and one or more noisy acquisitions of it.

    ``noisy`` has the shape of ``clean``, or ``(N, *clean.shape)`` for N noisy versions.
    """
    c = _as_array(clean, "clean image")
    x = _as_array(noisy, "noisy image")
    if x.shape == c.shape:
        s = c
    elif x.shape[1:] == c.shape:
        s = np.broadcast_to(c[None], x.shape)
    else:
        raise InputError(
            f"clean image has shape {c.shape} but noisy data have shape {x.shape}: the noisy data "
            "must have the clean image's shape, or be a stack (N, *clean shape)"
        )
    return check_pairs(s, x, "clean")


def pairs_from_pseudo_clean(
    noisy, pseudo_clean, clip_percentiles: tuple[float, float] | None = (0.5, 99.5),
    source: str = "pseudo-clean",
) -> NoisePairs:
    """Pairs (noisy, pseudo-clean) for bootstrapping, with the signal range clipped.

    Pairs whose pseudo-clean value lies outside the ``clip_percentiles`` of the pseudo-clean image
    are left out: the extremes of a denoiser's output are where it is least reliable, and a few of
    them would otherwise stretch the fitted signal range. ``None`` keeps every pair.
    """
    x = _as_array(noisy, "noisy image")
    s = _as_array(pseudo_clean, "pseudo-clean image")
    if s.shape != x.shape:
        raise InputError(
            f"pseudo-clean image has shape {s.shape} but the noisy data have shape {x.shape}: "
            "they must match pixel for pixel"
        )
    s, x = s.ravel(), x.ravel()
    if clip_percentiles is not None:
        lo_p, hi_p = (float(v) for v in clip_percentiles)
        if not 0.0 <= lo_p < hi_p <= 100.0:
            raise InputError(
                f"clip percentiles must satisfy 0 <= low < high <= 100, got {clip_percentiles}"
            )
        lo, hi = np.percentile(s, [lo_p, hi_p])
        keep = (s >= lo) & (s <= hi)
        s, x = s[keep], x[keep]
    return check_pairs(s, x, source)


def split_pairs(pairs: NoisePairs, val_fraction: float, seed: int = 0):
    """Random split into (train, held-out) pairs; returns two :class:`NoisePairs`."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(pairs)
    if val_fraction == 0.0:
        return pairs, None
    rng = np.random.default_rng(seed)
    held = rng.random(n, dtype=np.float32) < val_fraction
    if held.sum() < 100 or (~held).sum() < MIN_PAIRS:
        raise InputError(
            f"{n} pairs are too few to hold out {val_fraction:.0%} for validation: use more data or "
            "val_fraction=0"
        )
    tr = NoisePairs(pairs.signal[~held], pairs.observation[~held], pairs.source, pairs.notes,
                    pairs.record)
    va = NoisePairs(pairs.signal[held], pairs.observation[held], pairs.source, pairs.notes,
                    pairs.record)
    return tr, va
