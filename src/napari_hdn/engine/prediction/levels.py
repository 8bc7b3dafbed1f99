"""Which latent levels to switch off: what each removes, and a suggested setting.

Structured noise (stripes, scan lines, correlated camera noise) is not explained by the pixel noise
model, so a trained HDN keeps it in its estimate, carried by the lowest latent levels. Switching a
level off (the image no longer reaches it) removes what only that level explains. Whether what goes
is an artefact or real structure shows in *where* it goes: an artefact is independent of the image
(it is as strong on a flat background as on a cell), while real detail that goes is detail of the
image, so the removed part is strongest where the estimate has edges and fine structure. This is the
"method noise" test of denoising (Buades et al. 2005): what a method removes should not look like
the image.

:func:`describe_levels` switches off the bottom 1, 2, ... levels in turn (in ``prior-mean`` mode
by default) on a crop of the image and scores each step by

- ``energy``: the mean square of what this level removes, in units of the pixel noise variance;
- ``structure``: correlation between where it removes (local energy of the removed part) and where
  the remaining estimate has structure (local gradient energy), both at the level's own scale
  (the gradient and the smoothing window are ``2**k`` pixels for level ``k``, the spacing of its
  latent grid): near 0 for an artefact, clearly positive when real detail goes;
- ``dll``: the change of the noisy data's mean log-likelihood under the noise model (nats/pixel).

The suggestion is the deepest run of bottom levels whose removal looks like an artefact (structure
below :data:`STRUCTURE_LIMIT`, energy above :data:`MIN_ENERGY` and at most :data:`MAX_GROWTH` times
the energy the level below removed), within the lower half of the levels
(:func:`max_suggested_level`); a level whose removal looks like structure, or grows that fast, is
flagged ``"signal"``, and switching it off deserves a warning. The growth test reads the hierarchy:
structured noise sits mostly in the finest levels, while an image's energy grows towards coarse
scales, so a level that removes far more than the one below it is taking the image's content.

The limits and the cap were chosen against the true change of the error on structured-noise
images (``benchmarks/artefacts.py``; the figures are in docs/artefact-removal.md and
docs/lab-notes.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ..config import OFF_MODES
from ..data.arrays import as_float_array
from ..errors import InputError

#: a removal whose local energy correlates with the estimate's structure above this is "signal"
STRUCTURE_LIMIT = 0.25
#: a removal weaker than this (in units of the pixel noise variance) is "nothing": no suggestion
MIN_ENERGY = 0.02
#: a level removing more than this many times the energy of the level below it is "signal"
MAX_GROWTH = 2.0
#: largest side of the crop analysed
DEFAULT_CROP = 256


@dataclass
class LevelStep:
    """Switching off level ``level`` on top of the levels below it."""

    level: int
    energy: float
    structure: float
    dll: float
    verdict: str  # "artefact", "signal" or "nothing"


@dataclass
class LevelReport:
    """What switching off the bottom levels removes, and the suggested setting."""

    mode: str
    steps: list[LevelStep]
    suggested: list[str]  # one mode per level, index 0 = level 1
    crop: tuple[int, int, int, int]  # y0, x0, h, w of the crop analysed
    n_samples: int
    notes: list[str] = field(default_factory=list)

    @property
    def levels_off(self) -> list[int]:
        return [i + 1 for i, m in enumerate(self.suggested) if m != "posterior"]

    def step(self, level: int) -> LevelStep | None:
        return next((s for s in self.steps if s.level == level), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "levels_off": self.levels_off}

    def lines(self) -> list[str]:
        """Human-readable summary, one line per level and one for the suggestion."""
        out = []
        for s in self.steps:
            out.append(f"level {s.level}: removes {s.energy:.3f} x the pixel noise variance, "
                       f"structure {s.structure:+.2f}, log-likelihood {s.dll:+.4f} nats/px -> "
                       f"{s.verdict}")
        off = self.levels_off
        out.append("suggested: " + (f"levels {','.join(map(str, off))} {self.mode}" if off
                                    else "all levels on (no structured noise found)"))
        return out + self.notes


def _smooth(a: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    return ndi.gaussian_filter(a.astype(np.float64), sigma)


def structure_correlation(removed: np.ndarray, estimate: np.ndarray, scale: float = 1.0) -> float:
    """Correlation between where ``removed`` is strong and where ``estimate`` has structure.

    ``scale`` (pixels) is the gradient's Gaussian; both maps are smoothed over ``max(2, scale)``.
    :func:`describe_levels` uses ``2**k`` for level ``k``, the spacing of that level's latent grid
    (chosen by measurement: see the module's notes).
    """
    window = max(2.0, float(scale))
    e = _smooth(removed.astype(np.float64) ** 2, window)
    g = _smooth(ndi.gaussian_gradient_magnitude(estimate.astype(np.float64), scale) ** 2, window)
    e, g = e - e.mean(), g - g.mean()
    den = float(np.sqrt((e * e).sum() * (g * g).sum()))
    return float((e * g).sum() / den) if den > 0 else 0.0


def mean_log_likelihood(noise_model, x: np.ndarray, s: np.ndarray) -> float:
    """Mean log p(x | s) per pixel under ``noise_model`` (on the noise model's device)."""
    import torch

    dev = next(iter(noise_model.buffers()), torch.empty(0)).device
    with torch.no_grad():
        ll = noise_model.log_likelihood(torch.as_tensor(x, dtype=torch.float32, device=dev),
                                        torch.as_tensor(s, dtype=torch.float32, device=dev))
    return float(ll.double().mean())


def level_verdict(energy: float, structure: float, below: float | None = None) -> str:
    """"nothing", "signal" or "artefact" for a level that removes ``energy`` (pixel noise variances)
    with ``structure``, ``below`` being the energy the level below it removed (None for the first)."""
    if energy < MIN_ENERGY:
        return "nothing"
    grows = below is not None and below >= MIN_ENERGY and energy > MAX_GROWTH * below
    return "signal" if structure > STRUCTURE_LIMIT or grows else "artefact"


def max_suggested_level(levels: int) -> int:
    """The highest level a suggestion switches off: the lower half of the hierarchy (at least 1).

    The upper levels carry the image's layout (where the cells are, their shapes): structured noise
    lives in the fine levels, and the paper's line-artefact model kept its top four of six levels.
    """
    return max(1, levels // 2)


def _crop(arr: np.ndarray, side: int, m: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    H, W = arr.shape
    h, w = min(H, side), min(W, side)
    y0 = (H - h) // 2 // m * m
    x0 = (W - w) // 2 // m * m
    return arr[y0:y0 + h, x0:x0 + w], (y0, x0, h, w)


def describe_levels(model, image, n_samples: int = 8, *, mode: str = "prior-mean",
                    seed: int = 0, crop: int = DEFAULT_CROP, frame: int | None = None,
                    device=None, stop_flag=None) -> LevelReport:
    """Score switching off the bottom 1, 2, ... levels of ``model`` on ``image``; suggest a setting.

    Parameters
    ----------
    model : HDNModel
    image : 2D array, or frames (the middle frame, or ``frame``, is analysed)
    n_samples : posterior samples per setting (the same seed for every setting, so the differences
        between settings are not sampling noise)
    mode : how a level is switched off: "prior-mean" (default: measured 0.1-0.15 dB better than
        "prior-sample" on the artefact benchmark), "prior-sample" or "zero"
    crop : largest side of the centre crop analysed (the cost is ``levels * n_samples`` top-down
        passes of the crop)
    """
    from ..options import check_options
    from .run import check_finite_result
    from .sampling import PosteriorSampler

    c = check_options(n_samples=n_samples, crop=crop, seed=seed)
    n_samples, crop, seed = c["n_samples"], c["crop"], c["seed"]
    if mode not in OFF_MODES:
        raise InputError(f"mode must be one of {', '.join(OFF_MODES)}, not {mode!r}")
    arr = as_float_array(image)
    if arr.ndim < 2:
        raise InputError(f"describe_levels needs an image (2D or frames), got shape {arr.shape}")
    frames = arr.reshape(-1, *arr.shape[-2:])
    k = len(frames) // 2 if frame is None else int(frame)
    if not 0 <= k < len(frames):
        raise InputError(f"frame {frame} does not exist: the image has {len(frames)} frames")
    m = model.config.downscale
    x, where = _crop(frames[k], int(crop), m)
    L = model.levels
    base = model.default_modes()
    trained_off = [i for i, b in enumerate(base) if b != "posterior"]
    sampler = PosteriorSampler(model, x, origin=(where[0], where[1]), device=device,
                               reuse_mb=64.0)  # each setting shares the levels above the ones it changes
    nm = model.noise_model

    def mmse(modes):
        mean, _, _ = sampler.sample(n_samples, modes, seed=seed, stop_flag=stop_flag)
        check_finite_result(mean)
        return mean

    def loglik(s):
        return mean_log_likelihood(nm, x, s)

    import torch

    prev = mmse(base)
    with torch.no_grad():
        dev = next(iter(nm.buffers()), torch.empty(0)).device
        _, std = nm.moments(torch.as_tensor(prev, device=dev))
    noise_var = float((std.double() ** 2).mean())
    prev_ll = loglik(prev)
    steps: list[LevelStep] = []
    modes = list(base)
    for lv in range(1, L):  # the top level always stays
        if lv - 1 in trained_off:
            continue
        modes[lv - 1] = mode
        cur = mmse(modes)
        removed = prev - cur
        energy = float((removed.astype(np.float64) ** 2).mean()) / max(noise_var, 1e-12)
        struct = structure_correlation(removed, cur, scale=2.0 ** lv)
        ll = loglik(cur)
        verdict = level_verdict(energy, struct, steps[-1].energy if steps else None)
        steps.append(LevelStep(lv, energy, struct, ll - prev_ll, verdict))
        prev, prev_ll = cur, ll
    suggested = list(base)
    notes = []
    top = max_suggested_level(L)
    for s in steps:
        if s.verdict != "artefact":
            break
        if s.level > top:
            notes.append(f"level {s.level} also removes what looks like an artefact, but levels "
                         f"above {top} carry the image's layout: not suggested (switch it off by "
                         "hand to compare)")
            break
        suggested[s.level - 1] = mode
    if not any(s.verdict == "artefact" for s in steps[:1]):
        notes.append("level 1 removes no structured noise: keep every level on")
    return LevelReport(mode, steps, suggested, where, n_samples, notes)
