"""Previewing a latent level setting on a crop of the image, and what each level that is off costs.

The artefact widget runs :func:`preview_levels` in a worker thread and keeps a
:class:`PreviewCache`; nothing here knows of Qt. The bottom-up pass of a crop (a
:class:`~napari_hdn.engine.prediction.PosteriorSampler`) is computed once and cached, so a change
of levels only re-runs the top-down pass.

A level's cost is measured on the crop against the model's own setting (the reference: every
level on, except those withheld in training), with the same samples: the fraction of the
reference's energy (sum of squared deviations from its mean) that switching that level alone
removes, and the change of the noisy crop's mean log-likelihood under the noise model. Structured
noise such as stripes carries little energy; a level that removes much more carries signal. A
level's cost needs one extra top-down pass the first time (none when it is the only level off),
and is cached per crop.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .levels import mean_log_likelihood

#: the shortest side a preview window keeps where the image is large enough
MIN_PREVIEW_SIDE = 64
#: crops whose bottom-up pass, reference and costs are kept
MAX_CACHED_CROPS = 3


def auto_preview_side(model) -> int:
    """Crop side of the live preview: one top-down pass well under a second on a CPU.

    The top-down cost per pixel grows with filters² x (blocks + 1), so larger models get smaller
    crops (docs/artefact-removal.md lists the times).
    """
    c = model.config
    units = c.filters**2 * (c.blocks + 1)
    if units <= 32**2 * 3:
        return 256
    if units <= 48**2 * 4:
        return 192
    return 128


@dataclass(frozen=True)
class Region:
    """A preview crop: frame index (leading axes) and the 2D window, origin aligned to 2**L."""

    frame: tuple
    y0: int
    x0: int
    h: int
    w: int

    def key(self) -> tuple:
        return (self.frame, self.y0, self.x0, self.h, self.w)

    def cut(self, arr) -> np.ndarray:
        """This window of ``arr`` (frames first), as a contiguous 2D array."""
        return np.ascontiguousarray(arr[self.frame][self.y0:self.y0 + self.h,
                                                    self.x0:self.x0 + self.w])


def _centred_axis(size: int, c: float, n: int, m: int) -> tuple[int, int]:
    """(origin, length) of a window of about ``n`` along an axis of ``size`` centred on ``c``.

    The origin must be a multiple of ``m`` (the latent noise is keyed to it), so the length adapts
    instead: the window is centred on ``c`` to within half a pixel unless the image ends first. It
    is at most ``n`` long, unless that would leave it shorter than ``MIN_PREVIEW_SIDE``.
    """
    n = max(1, min(n, size))
    if c - n / 2 <= 0:
        return 0, n
    if c + n / 2 >= size:
        a = max(0, (size - n) // m * m)
        return a, size - a
    a = -(-int(np.floor(c - n / 2)) // m) * m  # the first aligned origin inside the window
    length = int(round(2 * (c - a)))
    if length < min(n, MIN_PREVIEW_SIDE):  # start one step earlier: a longer window
        a -= m
        length += 2 * m
    return a, max(1, min(length, size - a))


def centred_region(H: int, W: int, cy: float, cx: float, h: int, w: int, m: int):
    """Window of about h x w inside H x W centred on (cy, cx), origin a multiple of ``m``."""
    y0, hh = _centred_axis(H, cy, h, m)
    x0, ww = _centred_axis(W, cx, w, m)
    return y0, x0, hh, ww


def view_window(H: int, W: int, m: int, side: int, centre=None, visible=None):
    """(y0, x0, h, w) of the preview of an H x W image shown centred on ``centre`` (y, x; None:
    the image's centre) with ``visible`` (height, width) of it on screen (None: unknown).

    The window is at most ``side`` and 3/4 of what is visible (leaving input around it to compare
    with), at least ``MIN_PREVIEW_SIDE`` where the image allows, origin a multiple of ``m``.
    """
    cy, cx, vh, vw = H / 2, W / 2, side, side
    if centre is not None:
        if visible is not None and visible[0] > 0 and visible[1] > 0:
            vh, vw = min(side, int(0.75 * visible[0])), min(side, int(0.75 * visible[1]))
        cy, cx = float(np.clip(centre[0], 0, H)), float(np.clip(centre[1], 0, W))
    vh, vw = max(vh, min(MIN_PREVIEW_SIDE, H)), max(vw, min(MIN_PREVIEW_SIDE, W))
    return centred_region(H, W, cy, cx, int(vh), int(vw), m)


def crop_window(H: int, W: int, m: int, y: int, x: int, size: int):
    """(y0, x0, h, w) of a fixed crop of side ``size`` at (y, x), its origin rounded down to a
    multiple of ``m`` and the window cut at the image's edge."""
    y0, x0 = y // m * m, x // m * m
    if y0 >= H or x0 >= W:
        raise InputError(f"the crop origin ({y0}, {x0}) lies outside the image ({H}x{W})")
    return y0, x0, min(size, H - y0), min(size, W - x0)


def crop_key(model, region: Region, crop: np.ndarray) -> tuple:
    """Cache key of a crop: the model, the window and the crop's content (image layers reach
    plugins through proxies, so identities are not stable; content also catches edited data)."""
    digest = hashlib.blake2b(crop.tobytes(), digest_size=16).digest()
    return (id(model), *region.key(), crop.shape, str(crop.dtype), digest)


@dataclass(frozen=True)
class LevelCost:
    """What a level setting costs against the reference (see the module docstring)."""

    energy: float  # fraction of the reference's energy removed
    dll: float  # change of the noisy data's mean log-likelihood, nats/pixel


def level_cost(reference: np.ndarray, changed: np.ndarray, ll_ref: float,
               ll_changed: float) -> LevelCost:
    """The cost of ``changed`` against ``reference``, given both log-likelihoods."""
    ref = reference.astype(np.float64)
    energy = float(((ref - ref.mean()) ** 2).sum())
    removed = float(((ref - changed.astype(np.float64)) ** 2).sum())
    return LevelCost(removed / energy if energy > 0 else 0.0, ll_changed - ll_ref)


@dataclass
class Preview:
    """One preview, and what it computed on the way (for :meth:`PreviewCache.keep`)."""

    mmse: np.ndarray
    sampler: Any  # the crop's PosteriorSampler (its bottom-up pass)
    net: Any  # the model's inference copy
    cached: bool  # the bottom-up pass came from the cache
    reference: tuple[np.ndarray, float] | None  # the reference image and its log-likelihood
    costs: dict[tuple[int, str], LevelCost]  # (level, mode) -> its cost, for each level off
    total: LevelCost | None  # the whole setting's cost (None when it is the model's own)
    bottom_up_s: float
    top_down_s: float
    cost_s: float


def preview_levels(model, crop: np.ndarray, origin: tuple[int, int], modes: list[str],
                   n_samples: int, seed: int, *, sampler=None, net=None, reference=None,
                   known: dict | None = None, stop_flag=None) -> Preview:
    """The MMSE of ``n_samples`` on ``crop`` with ``modes`` (one per level), and the cost of each
    level that differs from the model's own setting.

    ``sampler``, ``net``, ``reference`` and ``known`` (costs by (level, mode)) are what an earlier
    preview of the same crop computed (:meth:`PreviewCache.reuse`); what is missing is computed.
    """
    from .sampling import inference_model

    t0 = time.perf_counter()
    ready = net if net is not None else inference_model(model)
    s = sampler if sampler is not None else ready.sampler(crop, origin=origin)
    t1 = time.perf_counter()

    def mmse_of(level_modes):
        return s.sample(n_samples, level_modes, seed=seed, stop_flag=stop_flag)[0]

    def loglik(img):
        return mean_log_likelihood(model.noise_model, crop, img)

    mmse = mmse_of(modes)
    t2 = time.perf_counter()
    base = model.default_modes()
    known = known or {}
    off = [(lv, m) for lv, m in enumerate(modes, start=1) if m != base[lv - 1]]
    ref = reference
    if ref is None and (not off or any(o not in known for o in off)):
        img = mmse if not off else mmse_of(base)
        ref = (img, loglik(img))
    costs = {}
    for lv, m in off:
        if (lv, m) in known:
            costs[(lv, m)] = known[(lv, m)]
            continue
        alone = mmse if len(off) == 1 else mmse_of(
            [m if i == lv - 1 else b for i, b in enumerate(base)])
        costs[(lv, m)] = level_cost(ref[0], alone, ref[1], loglik(alone))
    total = None
    if off and ref is not None:  # one level off: its own cost is the total (the same image)
        total = costs[off[0]] if len(off) == 1 else level_cost(ref[0], mmse, ref[1], loglik(mmse))
    return Preview(mmse, s, ready, sampler is not None, ref, costs, total, t1 - t0, t2 - t1,
                   time.perf_counter() - t2)


class PreviewCache:
    """What previews keep between level changes: the bottom-up passes of the last few crops, the
    model's inference copy, and per crop (and sample count and seed) the reference and the costs.

    Read and written in one thread (the GUI's); :meth:`reuse` hands a worker what it may use.
    """

    def __init__(self, max_crops: int = MAX_CACHED_CROPS) -> None:
        self.max_crops = max_crops
        self.samplers: OrderedDict = OrderedDict()  # crop key -> PosteriorSampler
        self.net: tuple | None = None  # (model, its inference copy)
        self.references: dict = {}  # (crop key, n, seed) -> (image, log-likelihood)
        self.costs: dict = {}  # (crop key, n, seed) -> {(level, mode): LevelCost}

    def clear(self) -> None:
        self.samplers.clear()
        self.net = None
        self.references.clear()
        self.costs.clear()

    def reuse(self, model, key: tuple, n_samples: int, seed: int) -> dict:
        """The keyword arguments of :func:`preview_levels` that this cache can fill."""
        ref = (key, n_samples, seed)
        net = self.net[1] if self.net is not None and self.net[0] is model else None
        return {"sampler": self.samplers.get(key), "net": net,
                "reference": self.references.get(ref), "known": dict(self.costs.get(ref, {}))}

    def keep(self, model, key: tuple, n_samples: int, seed: int, preview: Preview) -> None:
        """Remember what ``preview`` of ``model`` on the crop ``key`` computed; the oldest crop
        beyond ``max_crops`` is forgotten."""
        self.samplers[key] = preview.sampler
        self.samplers.move_to_end(key)
        if model is not None and id(model) == key[0]:
            self.net = (model, preview.net)
        while len(self.samplers) > self.max_crops:
            old = self.samplers.popitem(last=False)[0]
            for d in (self.references, self.costs):
                for k in [k for k in d if k[0] == old]:
                    del d[k]
        ref = (key, n_samples, seed)
        if preview.reference is not None:
            self.references[ref] = preview.reference
        self.costs.setdefault(ref, {}).update(preview.costs)

    def cost(self, key: tuple, n_samples: int, seed: int, level: int, mode: str):
        """The cached cost of switching ``level`` alone to ``mode``, or None."""
        return self.costs.get((key, n_samples, seed), {}).get((level, mode))
