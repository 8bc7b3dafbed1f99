"""Prediction: posterior samples, MMSE and variance, with the bottom-up pass computed once.

Sampling noise is keyed to position: the standard-normal draws of level i at latent pixel (y, x) for
sample k depend only on (seed, k, i, y, x). Tiles of a large image therefore draw exactly the noise
the whole image would, and a tiled prediction equals an untiled one wherever the tile overlap covers
the network's receptive field. It also makes results independent of the sample batch size.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import as_float_array, check_axes
from .device import resolve_device
from .errors import HDNWarning, InputError, StopRequested
from .events import Callback, Reporter, StopFlag
from .fastpath import fuse_for_inference
from .heap import keep_heap
from .ladder import pad_to_multiple
from .options import check_options

_NOISE_BLOCK = 32  # latent pixels per side of one independently seeded noise block


def _mix(*vals: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps), used to seed noise blocks."""
    h = 0x9E3779B97F4A7C15
    for v in vals:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


#: latent-noise schemes (see :class:`LatentNoise`); the default is the measured best
SAMPLING_SCHEMES = ("independent", "antithetic", "stratified")
DEFAULT_SAMPLING = "antithetic"
_STRATA = 8  # samples per stratified group


class LatentNoise:
    """Standard-normal latent noise keyed by (seed, sample, level, latent position).

    Every sample's noise is exactly standard normal and independent across latent positions,
    channels and levels, whatever the scheme; the schemes differ in how samples relate to each
    other (variance reduction of their mean, the MMSE):

    - ``"independent"``: plain Monte Carlo, samples independent.
    - ``"antithetic"``: samples come in pairs (2j, 2j+1) with opposite noise, eps and -eps; the
      part of the output that is odd in the noise (its linear part first) cancels in the mean.
    - ``"stratified"``: groups of 8 samples form a symmetric Latin hypercube per latent variable:
      the 8 draws of one variable fall one in each eighth of the normal distribution (randomly
      assigned to the samples, independently per variable), mirrored pairwise, so the group's draws
      are also antithetic.

    The draws of sample ``k`` depend on (seed, k, level, block of latent position) only, never on
    the sample batch or on the image's extent, so tiles and crops draw what the whole image would.
    """

    def __init__(self, seed: int, block: int = _NOISE_BLOCK, scheme: str = "independent"):
        if scheme not in SAMPLING_SCHEMES:
            raise InputError(f"unknown sampling scheme {scheme!r}: use one of "
                             f"{', '.join(SAMPLING_SCHEMES)}")
        self.seed = int(seed)
        self.block = block
        self.scheme = scheme
        self.group = {"independent": 1, "antithetic": 2, "stratified": _STRATA}[scheme]
        self._gen = torch.Generator()

    def _unit(self, level: int, unit: int, by: int, bx: int, z: int) -> torch.Tensor:
        """The draws of one group of samples in one noise block: (group, z, b, b)."""
        b, g = self.block, self.group
        gen = self._gen
        if self.scheme == "independent":
            gen.manual_seed(_mix(self.seed, unit, level, by, bx))
            return torch.randn(1, z, b, b, generator=gen)
        if self.scheme == "antithetic":
            # the pair's first sample draws what independent sampling's sample 2j would
            gen.manual_seed(_mix(self.seed, 2 * unit, level, by, bx))
            e = torch.randn(1, z, b, b, generator=gen)
            return torch.cat([e, -e])
        gen.manual_seed(_mix(self.seed, 0x5EED, unit, level, by, bx))
        # a random assignment of strata to samples per variable, and a position within each
        # stratum, mirrored: stratum r and g-1-r use v and 1-v
        keys = torch.rand(g, z, b, b, generator=gen)
        v = torch.rand(g // 2, z, b, b, generator=gen)
        lower = torch.arange(g // 2, dtype=v.dtype).view(-1, 1, 1, 1)
        e = torch.special.ndtri(((lower + v) / g).clamp_(min=torch.finfo(v.dtype).tiny))
        e = torch.cat([e, -e.flip(0)])  # draws of strata 0..g-1; exact mirror images
        return e.gather(0, keys.argsort(dim=0))

    def region(self, level: int, first_sample: int, shape: Sequence[int], origin: tuple[int, int]):
        """Noise of shape (n, z, h, w) for samples first_sample.. at latent origin (y0, x0)."""
        n, z, h, w = shape
        y0, x0 = origin
        b, g = self.block, self.group
        out = torch.empty(n, z, h, w)
        by0, by1 = y0 // b, (y0 + h - 1) // b
        bx0, bx1 = x0 // b, (x0 + w - 1) // b
        u0, u1 = first_sample // g, (first_sample + n - 1) // g
        for by in range(by0, by1 + 1):
            ya, yb = max(y0, by * b), min(y0 + h, (by + 1) * b)
            for bx in range(bx0, bx1 + 1):
                xa, xb = max(x0, bx * b), min(x0 + w, (bx + 1) * b)
                for unit in range(u0, u1 + 1):
                    blk = self._unit(level, unit, by, bx, z)
                    ka, kb = max(first_sample, unit * g), min(first_sample + n, (unit + 1) * g)
                    out[ka - first_sample : kb - first_sample, :, ya - y0 : yb - y0,
                        xa - x0 : xb - x0] = blk[ka - unit * g : kb - unit * g, :,
                                                 ya - by * b : yb - by * b, xa - bx * b : xb - bx * b]
        return out


@dataclass
class Prediction:
    """Result of :func:`predict`, in the input's intensity units and shape.

    Attributes
    ----------
    mmse : ndarray
        Minimum mean squared error estimate: the mean of the posterior samples.
    variance : ndarray
        Per-pixel variance of the samples (the model's uncertainty).
    samples : ndarray or None
        ``(n_samples, *image.shape)`` when requested.
    levels : list of str
        The latent mode of each level (index 0 = level 1).
    """

    mmse: np.ndarray
    variance: np.ndarray
    samples: np.ndarray | None
    levels: list[str]
    n_samples: int
    seed: int
    info: dict = field(default_factory=dict)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)


def _auto_sample_batch(filters: int, h: int, w: int, device: torch.device) -> int:
    """Samples per top-down pass.

    GPUs want wide batches (~10 full-resolution F-channel maps live per sample; 2 GiB budget). On
    CPUs, batches whose feature maps outgrow the caches are slower per sample (measured: batch 16 is
    1.7x slower per sample than batch 4 at 128x128, F=32), so maps are kept near 16 MiB.
    """
    one_map = filters * h * w * 4
    if device.type == "cpu":
        return int(max(1, min(8, (16 << 20) // max(one_map, 1))))
    return int(max(1, min(64, (2 << 30) // max(10 * one_map, 1))))


def inference_model(model, device=None):
    """The model to sample with on ``device``, leaving the caller's model exactly as it was.

    Sampling wants the network on ``device``, in eval mode, with its BatchNorms folded into the
    convolutions (:mod:`.fastpath`: the same numbers with less work) and, on a CPU, channels-last
    (NHWC convolutions are ~1.35x faster for inference with oneDNN, measured). A copy of the
    network is made for that (40 ms for the "fast CPU" preset, 0.2 s for the paper's architecture,
    on one CPU thread); passing the result to :func:`predict` or :class:`PosteriorSampler` again
    makes no further copy.
    """
    from .channels import MultiChannelModel

    if isinstance(model, MultiChannelModel):
        ready = [inference_model(m, device) for m in model.models]
        if all(a is b for a, b in zip(ready, model.models)):
            return model
        return MultiChannelModel(ready, model.info)
    device = resolve_device(device) if device is not None else model.device
    ladder = model.ladder
    if model.device == device and getattr(ladder, "fused_for_inference", False):
        return model
    net = copy.copy(model)  # shares config, noise model, normalisation and info
    net.ladder = fuse_for_inference(ladder).to(device)
    if device.type == "cpu":
        net.ladder.to(memory_format=torch.channels_last)
    return net


class PosteriorSampler:
    """The bottom-up pass of one 2D image, computed once, and sampling from it.

    Parameters
    ----------
    model : HDNModel
        Not changed: when ``device`` differs from the model's, or the network is not yet in the
        layout sampling wants, the sampler works on its own copy of the network.
    image : 2D array in raw intensity units.
    origin : (y, x) of this image within a larger image, multiples of 2**L. Used to key the latent
        noise so that a crop or a tile samples what the full image would.
    device : str or torch.device, optional
        Where to sample (default: where the model is).
    reuse_mb : float
        Memory (MiB) for the top-down states of earlier calls (default 0: none kept). With it, a
        call whose level modes differ from an earlier call's only below some level (same seed,
        scheme and sample indices) starts below the levels they share: toggling level 1 recomputes
        level 1 and the output head, not the levels above. The results are the same either way.
    """

    def __init__(self, model, image, origin: tuple[int, int] = (0, 0), device=None,
                 reuse_mb: float = 0.0):
        arr = as_float_array(image)
        if arr.ndim != 2:
            raise InputError(f"PosteriorSampler takes one 2D image, got shape {arr.shape}")
        m = model.config.downscale
        if origin[0] % m or origin[1] % m:
            raise InputError(f"origin {origin} must be a multiple of {m} (2**levels)")
        self.model = model
        self.device = resolve_device(device) if device is not None else model.device
        self.net = inference_model(model, self.device)
        self.shape = arr.shape
        self.origin = origin
        x = torch.from_numpy(model.normalisation.forward(arr)).to(self.device)[None, None]
        self.x, _ = pad_to_multiple(x, m)
        with torch.inference_mode():
            self.bu = self.net.ladder.bottom_up(self.x)
        self._states = _StateCache(int(max(0.0, float(reuse_mb)) * 2**20))

    def sample(
        self,
        n_samples: int = 100,
        modes=None,
        seed: int = 0,
        batch_size: int | None = None,
        keep_samples: bool = False,
        stop_flag: StopFlag | None = None,
        on_batch=None,
        first_sample: int = 0,
        sampling: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Draw ``n_samples`` posterior samples; return (mmse, variance, samples or None).

        The cached bottom-up pass is reused; samples are drawn ``batch_size`` at a time without
        autograd. Sample ``k`` is the same whatever the batch size; ``first_sample`` is the index of
        the first one, so that samples drawn in several calls equal those of one call.
        ``sampling`` is the latent-noise scheme (:data:`SAMPLING_SCHEMES`, default
        :data:`DEFAULT_SAMPLING`; see :class:`LatentNoise`).
        """
        c = check_options(n_samples=n_samples, batch_size=batch_size)
        n_samples, batch_size = c["n_samples"], c["batch_size"]
        model = self.net
        modes = model.resolve_modes(modes)
        ladder = model.ladder
        h, w = self.shape
        bs = batch_size or _auto_sample_batch(model.config.filters, *self.x.shape[-2:], self.device)
        noise = LatentNoise(seed, scheme=sampling or DEFAULT_SAMPLING)
        acc = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        mean = torch.zeros(h, w, dtype=acc, device=self.device)
        m2 = torch.zeros_like(mean)
        count = 0
        kept = np.empty((n_samples, h, w), np.float32) if keep_samples else None
        norm = model.normalisation
        with keep_heap(self.device), torch.inference_mode():
            for first in range(0, n_samples, bs):
                if stop_flag is not None:
                    stop_flag.check()
                k = min(bs, n_samples - first)
                bu_k = [b.expand(k, -1, -1, -1) for b in self.bu]

                def eps(level, shape, _first=first_sample + first):
                    s = 2**level
                    o = (self.origin[0] // s, self.origin[1] // s)
                    return noise.region(level, _first, shape, o).to(self.device)

                key = (seed, noise.scheme, first_sample + first, k)
                start = self._states.find(key, modes)
                s, _ = ladder.top_down(bu_k, modes, eps, compute_kl=False, start=start,
                                       keep=self._states.keeper(key, modes))
                s = norm.inverse(s[:, 0, :h, :w]).to(acc)
                # Chan et al. parallel update of mean and sum of squared deviations
                bmean = s.mean(0)
                bm2 = ((s - bmean) ** 2).sum(0)
                delta = bmean - mean
                tot = count + k
                mean += delta * (k / tot)
                m2 += bm2 + delta**2 * (count * k / tot)
                count = tot
                if kept is not None:
                    kept[first : first + k] = s.float().cpu().numpy()
                if on_batch is not None:
                    on_batch(count)
        var = (m2 / count).float().cpu().numpy()
        return mean.float().cpu().numpy(), var, kept


class _StateCache:
    """Top-down states of earlier sampling calls, least recently used first out, within a byte
    budget. Entry ``(batch key, level, modes of that level and above)`` holds the output of
    ``level``: it depends on nothing else (the bottom-up features are the sampler's own)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def find(self, key: tuple, modes: list[str]) -> tuple[int, torch.Tensor] | None:
        """The lowest level whose output is known for these modes (most work saved), or None."""
        for level in range(1, len(modes) + 1):
            k = (key, level, tuple(modes[level - 1:]))
            h = self.items.get(k)
            if h is not None:
                self.items.move_to_end(k)
                return level, h
        return None

    def drop(self, up_to_level: int) -> None:
        """Forget the outputs of levels 1..``up_to_level`` (benchmarks time first visits so)."""
        for k in [k for k in self.items if k[1] <= up_to_level]:
            self.used -= self.items.pop(k).nbytes

    def keeper(self, key: tuple, modes: list[str]):
        if self.budget <= 0:
            return None

        def keep(level: int, h: torch.Tensor) -> None:
            size = h.nbytes
            k = (key, level, tuple(modes[level - 1:]))
            if size > self.budget or k in self.items:
                return
            while self.items and self.used + size > self.budget:
                self.used -= self.items.popitem(last=False)[1].nbytes
            self.items[k] = h.clone()  # the network may reuse its buffers
            self.used += size

        return keep


def as_model(model):
    """An HDNModel as it is; a path is loaded (so ``napari_hdn.predict("m.hdn", image)`` works)."""
    import os

    from .channels import MultiChannelModel
    from .model import HDNModel, load_model

    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if not isinstance(model, (HDNModel, MultiChannelModel)):
        raise InputError(f"model must be an HDNModel or the path of a model file, not "
                         f"{type(model).__name__}")
    return model


#: an image whose mean lies this many training stds from the training mean gets a warning
FAR_FROM_TRAINING = 3.0


def check_training_range(model, arr: np.ndarray) -> str:
    """Warn (:class:`HDNWarning`) when ``arr`` is far from the data ``model`` was trained on: a
    network sees only normalised data, so an image in other units gives a plausible-looking but
    wrong result. Returns the message ("" when the data are alike)."""
    norm = model.normalisation
    sub = arr.ravel()[:: max(1, arr.size // 1_000_000)].astype(np.float64)
    mean, std = float(sub.mean()), float(sub.std())
    off = abs(mean - norm.mean) / norm.std
    ratio = std / norm.std
    if off <= FAR_FROM_TRAINING and ratio <= FAR_FROM_TRAINING**2:  # a calm crop is no concern
        return ""
    msg = (f"the image (mean {mean:.4g}, std {std:.4g}) is far from the data the model was trained "
           f"on (mean {norm.mean:.4g}, std {norm.std:.4g}; the image's mean is {off:.1f} training "
           "stds away): the result may look plausible and still be wrong; use a model trained on "
           "data like this (same camera, settings and units)")
    warnings.warn(msg, HDNWarning, stacklevel=3)
    return msg


def check_some_level_active(modes: list[str]) -> None:
    """Refuse switching every latent level off: the result would ignore the image."""
    if "posterior" not in modes:
        raise InputError(
            f"every latent level is switched off ({', '.join(modes)}): the result would not depend "
            "on the image at all; keep at least one level (usually the top one) as 'posterior'"
        )


def check_finite_result(*arrays) -> None:
    """Refuse a prediction with NaN or infinite values rather than hand it on as a result."""
    bad = sum(int((~np.isfinite(a)).sum()) for a in arrays)
    if bad:
        raise InputError(
            f"the prediction has {bad} NaN or infinite values: the model does not work on this "
            "image (values far outside its training data, or damaged weights); nothing is returned"
        )


def _tile_starts(size: int, tile: int, overlap: int, m: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] + tile < size:
        starts.append(-(-(size - tile) // m) * m)  # aligned; the last tile may run past the end
    return starts


def _valid_ranges(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """Which output rows each tile owns: boundaries in the middle of each overlap."""
    ends = [min(s + tile, size) for s in starts]
    out = []
    for i, s in enumerate(starts):
        a = 0 if i == 0 else (s + ends[i - 1]) // 2
        b = size if i == len(starts) - 1 else (starts[i + 1] + ends[i]) // 2
        out.append((a, b))
    return out


def _orientations():
    """The 8 flips/rotations of the last two axes: (forward, inverse) pairs; the first is identity."""
    out = []
    for t in range(8):
        k, flip = t % 4, t >= 4

        def fwd(a, k=k, flip=flip):
            return np.ascontiguousarray(np.rot90(a[..., ::-1] if flip else a, k, axes=(-2, -1)))

        def inv(a, k=k, flip=flip):
            b = np.rot90(a, -k, axes=(-2, -1))
            return np.ascontiguousarray(b[..., ::-1] if flip else b)

        out.append((fwd, inv))
    return out


def predict(
    model,
    image,
    n_samples: int = 100,
    *,
    axes: str | None = None,
    levels=None,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    return_samples: bool = False,
    device: str | None = None,
    callbacks: Callback | list[Callback] | None = None,
    stop_flag: StopFlag | None = None,
    first_sample: int = 0,
    sampling: str | None = None,
    tta: bool = False,
) -> Prediction:
    """Draw posterior samples of a trained HDN and summarise them.

    Parameters
    ----------
    model : HDNModel
    image : ndarray
        Noisy image: YX, or frames (SYX/TYX/ZYX, ...) each restored independently.
    n_samples : int
        Posterior samples per image (paper: 100). The MMSE is their mean. With the default
        antithetic sampling, 8 samples gave an MMSE closer to the exact one than 100 independent
        samples on the models measured (docs/benchmarks.md, "MMSE speed"); the variance (the
        per-pixel uncertainty) gains less from it and still wants many samples.
    axes : str, optional
        Axes of ``image`` when ambiguous.
    levels : list or dict, optional
        Latent mode per level: ``"posterior"`` (normal), ``"prior-mean"`` or ``"zero"``; a list
        of L modes (first = level 1) or ``{level: mode}``. Switching off low levels removes
        spatially correlated (structured) noise.
    tile_size, tile_overlap : int, optional
        Tile large images (multiples of 2**L are used). Default: untiled up to 1024x1024 pixels,
        else tiles of 512; the overlap defaults to a quarter of the tile, at most 64 (at least 2**L).
    batch_size : int, optional
        Samples drawn in one pass (default: chosen from the image size).
    seed : int
        Same seed, same samples (also across tile sizes and batch sizes).
    return_samples : bool
        Keep all samples (``n_samples`` times the memory of the image).
    device : str, optional
        Where to sample (default: where the model is). The model itself is not moved.
    first_sample : int
        Index of the first sample drawn: samples ``first_sample .. first_sample + n_samples - 1``
        are those a single call with more samples would draw (see :func:`predict_in_rounds`).
    sampling : str, optional
        Latent-noise scheme: ``"antithetic"`` (default: samples in pairs with opposite latent
        noise), ``"stratified"`` or ``"independent"`` (plain Monte Carlo). Every sample is an exact
        posterior sample whatever the scheme; see :class:`LatentNoise`.
    tta : bool
        Test-time augmentation: predict each of the 8 flips/rotations of the image (``n_samples``
        each, so 8 times the work) and average; the variance is that of all 8 x ``n_samples``
        samples. Orientation t (rotation by t % 4 quarter turns after a left-right flip when t >= 4)
        samples with seed ``info["tta_seeds"][t]`` (the first is ``seed``). Not with
        ``return_samples``.

    Returns
    -------
    Prediction

    Raises
    ------
    InputError
        A bad image or axes, an option out of range (``n_samples``, ``batch_size``, ``tile_size``
        and ``tile_overlap``: see :mod:`napari_hdn.engine.options`), every latent level switched
        off, an unknown sampling scheme, or a model that gives NaN or infinite values on this image.
    ModelFileError
        ``model`` is a path to a file that is not a usable model.
    """
    from .channels import MultiChannelModel, check_channels, layout_of

    model = as_model(model)
    layout = layout_of(np.shape(image), axes)
    check_channels(model, layout)
    if isinstance(model, MultiChannelModel):
        return _predict_channels(
            model, image, layout, n_samples, levels=levels, tile_size=tile_size,
            tile_overlap=tile_overlap, batch_size=batch_size, seed=seed,
            return_samples=return_samples, device=device, callbacks=callbacks,
            stop_flag=stop_flag, first_sample=first_sample, sampling=sampling, tta=tta)
    c = check_options(n_samples=n_samples, batch_size=batch_size, tile_size=tile_size,
                      tile_overlap=tile_overlap, seed=seed)
    n_samples, batch_size, tile_size, tile_overlap, seed = (
        c["n_samples"], c["batch_size"], c["tile_size"], c["tile_overlap"], c["seed"])
    sampling = sampling or DEFAULT_SAMPLING
    if sampling not in SAMPLING_SCHEMES:
        raise InputError(f"unknown sampling scheme {sampling!r}: use one of "
                         f"{', '.join(SAMPLING_SCHEMES)}")
    if tta and return_samples:
        raise InputError("test-time augmentation averages over 8 orientations and keeps no "
                         "samples: use tta=False to keep samples, or return_samples=False")
    arr = as_float_array(image)
    ax = check_axes(axes, arr.shape)
    modes = model.resolve_modes(levels)
    check_some_level_active(modes)
    if first_sample == 0:  # once, not again for each round of predict_in_rounds
        check_training_range(model, arr)
    dev = resolve_device(device) if device is not None else model.device
    net = inference_model(model, dev)  # one copy (if any) for all tiles
    m = model.config.downscale
    frames = arr.reshape(-1, *arr.shape[-2:])
    views = _orientations() if tta else [(lambda a: a, lambda a: a)]
    tiling = None
    seeds = [seed if t == 0 else _mix(seed, 0x77A, t) & 0x7FFFFFFF for t in range(len(views))]
    report = Reporter("predict", callbacks)
    units = 0
    plans = []
    for fwd, _ in views:
        H, W = fwd(frames[:1]).shape[-2:]
        plan = _tile_plan(H, W, tile_size, tile_overlap, m)
        plans.append(plan)
        units += len(frames) * len(plan[0]) * len(plan[1])
    total = units * n_samples
    report("start", total=total)
    mmse = np.zeros(frames.shape, np.float64 if tta else np.float32)
    var = np.zeros_like(mmse)
    samples = np.empty((n_samples, *frames.shape), np.float32) if return_samples else None
    done = 0
    with keep_heap(dev):
        for t, ((fwd, inv), plan) in enumerate(zip(views, plans)):
            mu, v, smp, done = _predict_frames(
                net, fwd(frames), plan, n_samples, modes, seeds[t], batch_size, return_samples,
                dev, stop_flag, first_sample, sampling, report, done, total)
            mu, v = inv(mu), inv(v)
            if not tta:
                mmse, var, samples = mu, v, smp
            else:  # mixture of the orientations: mean of means; mean variance + variance of means
                mmse += mu
                var += v + mu.astype(np.float64) ** 2
            tiling = plan
    if tta:
        mmse /= len(views)
        var = np.maximum(var / len(views) - mmse**2, 0.0)
        mmse, var = mmse.astype(np.float32), var.astype(np.float32)
    report("done", step=total, total=total)
    check_finite_result(mmse, var)
    shape = arr.shape
    tile, ys, xs = tiling[2], tiling[0], tiling[1]
    return Prediction(
        mmse=mmse.reshape(shape),
        variance=var.reshape(shape),
        samples=None if samples is None else samples.reshape(n_samples, *shape),
        levels=modes,
        n_samples=n_samples,
        seed=seed,
        info={"axes": ax, "tile_size": tile, "tiles": len(ys) * len(xs), "sampling": sampling,
              "tta": len(views), **({"tta_seeds": seeds} if tta else {})},
    )


def channel_seed(seed: int, channel: int) -> int:
    """The latent-noise seed of ``channel`` (0-based; channel 0 keeps ``seed``): the channels'
    samples do not share their latent noise."""
    return seed if channel == 0 else _mix(seed, 0xC4A, channel) & 0x7FFFFFFF


def _predict_channels(model, image, layout, n_samples, *, callbacks, seed, return_samples,
                      **kwargs) -> Prediction:
    """:func:`predict` of each channel with its own model, put back in the input's layout."""
    arr = np.asarray(image)
    report = Reporter("predict", callbacks)
    n = layout.channels
    offset, per, results = 0, 0, []

    def relay(ev):
        nonlocal per
        if ev.kind == "start":
            per = ev.total
            if not results:
                report("start", step=0, total=per * n)
        elif ev.kind == "step":
            report("step", step=offset + ev.step, total=per * n)

    for c in range(n):
        offset = c * per
        results.append(predict(model.models[c], layout.channel_view(arr, c), n_samples,
                               axes=layout.frame_axes, seed=channel_seed(seed, c),
                               return_samples=return_samples, callbacks=relay, **kwargs))
    report("done", step=per * n, total=per * n)
    first = results[0]
    return Prediction(
        mmse=layout.stack([r.mmse for r in results]),
        variance=layout.stack([r.variance for r in results]),
        samples=None if first.samples is None else layout.stack([r.samples for r in results], 1),
        levels=first.levels, n_samples=first.n_samples, seed=seed,
        info={**first.info, "axes": layout.axes, "channels": n,
              "channel_seeds": [channel_seed(seed, c) for c in range(n)]})


def _tile_plan(H: int, W: int, tile_size, tile_overlap, m: int):
    """(y starts, x starts, tile, y ranges, x ranges) of an H x W frame."""
    if tile_size is None and H * W > 1024 * 1024:
        tile_size = 512
    tile, ov = None, 0
    if tile_size is not None:
        tile = max(m, -(-int(tile_size) // m) * m)
        ov = tile_overlap if tile_overlap is not None else max(m, min(64, tile // 4))
        ov = -(-int(ov) // m) * m
        if ov >= tile:
            raise InputError(
                f"tile overlap {ov} must be smaller than the tile size {tile}: choose a larger tile"
            )
    ys = _tile_starts(H, tile, ov, m) if tile else [0]
    xs = _tile_starts(W, tile, ov, m) if tile else [0]
    yr = _valid_ranges(ys, tile, H) if tile else [(0, H)]
    xr = _valid_ranges(xs, tile, W) if tile else [(0, W)]
    return ys, xs, tile, yr, xr


def _predict_frames(net, frames, plan, n_samples, modes, seed, batch_size, return_samples, dev,
                    stop_flag, first_sample, sampling, report, done, total):
    """MMSE, variance and samples (or None) of each frame, tile by tile; returns the count done."""
    ys, xs, tile, yr, xr = plan
    H, W = frames.shape[-2:]
    mmse = np.empty(frames.shape, np.float32)
    var = np.empty(frames.shape, np.float32)
    samples = np.empty((n_samples, *frames.shape), np.float32) if return_samples else None
    for f, frame in enumerate(frames):
        for y0, (ya, yb) in zip(ys, yr):
            for x0, (xa, xb) in zip(xs, xr):
                y1 = H if tile is None else min(y0 + tile, H)
                x1 = W if tile is None else min(x0 + tile, W)
                sampler = PosteriorSampler(net, frame[y0:y1, x0:x1], origin=(y0, x0), device=dev)
                base = done

                def progress(c, _base=base):
                    report("step", step=_base + c, total=total)

                mu, v, smp = sampler.sample(
                    n_samples, modes, seed, batch_size, return_samples, stop_flag=stop_flag,
                    on_batch=progress, first_sample=first_sample, sampling=sampling,
                )
                done += n_samples
                sl = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
                mmse[f, ya:yb, xa:xb] = mu[sl]
                var[f, ya:yb, xa:xb] = v[sl]
                if samples is not None:
                    samples[:, f, ya:yb, xa:xb] = smp[(slice(None), *sl)]
    return mmse, var, samples, done


def _round_sizes(n_samples: int, first: int = 8):
    """Samples per round: ``first`` a few times, then half of what is done rounded up to even (at
    most 7 rounds for 100 samples), the last round taking a small remainder along."""
    done = 0
    while done < n_samples:
        k = max(first, done // 2 + done // 2 % 2)  # even: antithetic pairs stay within a round
        left = n_samples - done
        if left - k < first:
            k = left
        k = min(k, left)
        yield k
        done += k


def predict_in_rounds(model, image, n_samples: int = 100, *, stop_flag: StopFlag | None = None,
                      callbacks: Callback | list[Callback] | None = None, return_samples: bool = False,
                      **kwargs) -> Prediction:
    """:func:`predict` in rounds over the whole image, so that a stop keeps what was drawn.

    Each round draws the next samples of every pixel (latent noise is keyed by the sample's index,
    so the result equals one :func:`predict` call with the same seed). A stop request ends the
    running round; the samples of the finished rounds are returned, with ``n_samples`` saying how
    many and ``info["stopped"]`` True. Raises :class:`StopRequested` only when no round finished.
    Each round repeats the bottom-up pass (about half a sample's cost), a few percent in all.

    ``kwargs`` are those of :func:`predict`; its ``"predict"`` progress events count samples over
    all rounds.
    """
    device = kwargs.get("device")
    with keep_heap(resolve_device(device) if device is not None else None):
        return _predict_in_rounds(model, image, n_samples, stop_flag=stop_flag,
                                  callbacks=callbacks, return_samples=return_samples, **kwargs)


def _predict_in_rounds(model, image, n_samples, *, stop_flag, callbacks, return_samples,
                       **kwargs) -> Prediction:
    model = as_model(model)
    n_samples = check_options(n_samples=n_samples)["n_samples"]
    report = Reporter("predict", callbacks)
    device = kwargs.pop("device", None)
    model = inference_model(model, device)  # one copy (if any) for all rounds
    done, mean, m2, kept, last = 0, None, None, None, None
    units = 1  # frames x tiles: the engine counts one step per sample and tile
    stopped = False
    report("start", step=0, total=n_samples)
    for k in _round_sizes(int(n_samples)):
        base = done

        def relay(ev, _base=base, _k=k):
            nonlocal units
            if ev.kind == "start" and ev.total:
                units = max(1, ev.total // _k)
            elif ev.kind == "step":
                report("step", step=_base + ev.step // units, total=n_samples)

        try:
            res = predict(model, image, k, stop_flag=stop_flag, callbacks=relay,
                          return_samples=return_samples, first_sample=done, **kwargs)
        except StopRequested:
            if done == 0:
                raise
            stopped = True
            break
        mu, var = res.mmse.astype(np.float64), res.variance.astype(np.float64)
        if mean is None:
            mean, m2 = mu, var * k
            if return_samples:
                kept = np.empty((n_samples, *mu.shape), np.float32)
        else:  # Chan et al.: merge the round's mean and squared deviations into the totals
            delta = mu - mean
            tot = done + k
            mean += delta * (k / tot)
            m2 += var * k + delta**2 * (done * k / tot)
        if kept is not None:
            kept[done : done + k] = res.samples
        done += k
        last = res
    report("stopped" if stopped else "done", step=done, total=n_samples)
    return Prediction(
        mmse=mean.astype(np.float32),
        variance=(m2 / done).astype(np.float32),
        samples=None if kept is None else kept[:done],
        levels=last.levels,
        n_samples=done,
        seed=last.seed,
        info={**last.info, "stopped": stopped, "n_requested": int(n_samples)},
    )
