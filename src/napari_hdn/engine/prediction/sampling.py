"""Prediction: posterior samples, MMSE and variance, with the bottom-up pass computed once.

Sampling noise is keyed to position: the standard-normal draws of level i at latent pixel (y, x) for
sample k depend only on (seed, k, i, y, x). Tiles of a large image therefore draw exactly the noise
the whole image would, and a tiled prediction equals an untiled one wherever the tile overlap covers
the network's receptive field. It also makes results independent of the sample batch size.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.arrays import as_float_array
from ..device import resolve_device
from ..errors import InputError
from ..events import StopFlag
from ..heap import keep_heap
from ..network.fastpath import fuse_for_inference
from ..network.ladder import pad_to_multiple
from ..network.multichannel import MultiChannelModel
from ..options import check_options

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


@dataclass(frozen=True)
class AutoSamples:
    """Draw posterior samples until the MMSE's Monte-Carlo error is small enough ("auto").

    The rule compares the MMSE of the samples drawn with that of ``reference`` independent
    samples (the paper's and the reference code's 100). Its error against the truth is the
    exact MMSE's error plus the Monte-Carlo variance of the mean. Both parts are estimated from
    the samples themselves: the posterior variance (the mean of the per-pixel sample variance)
    is the model's own estimate of the exact MMSE's squared error, and the Monte-Carlo variance
    of the mean is the variance of the mean of independent units (antithetic pairs, stratified
    groups of 8, or pairs of independent samples) divided by their count. Sampling stops, per
    frame (per tile of a tiled frame), once

        MC variance <= posterior variance * ((1 + 1/reference) * 10**(tolerance_db / 10) - 1),

    that is, once the expected PSNR is at most ``tolerance_db`` below that of ``reference``
    independent samples, and never before ``min_samples`` nor after ``max_samples`` samples.
    With antithetic sampling the odd part of the output cancels within a pair, so the MC
    variance of a pair is far below half the posterior variance: most frames stop at the floor.
    """

    tolerance_db: float = 0.05
    reference: int = 100
    min_samples: int = 8
    max_samples: int = 100

    def __post_init__(self):
        if not (self.tolerance_db > 0 and np.isfinite(self.tolerance_db)):
            raise InputError(f"the sampling tolerance must be a positive number of dB, not "
                             f"{self.tolerance_db!r}")
        for name in ("reference", "min_samples", "max_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"{name} of the sampling rule must be a whole number >= 1, "
                                 f"not {v!r}")
        if self.max_samples < self.min_samples:
            raise InputError(f"max_samples ({self.max_samples}) must be at least min_samples "
                             f"({self.min_samples})")

    @property
    def factor(self) -> float:
        """The allowed MC variance of the MMSE, as a fraction of the posterior variance."""
        return (1.0 + 1.0 / self.reference) * 10 ** (self.tolerance_db / 10) - 1.0

    def describe(self) -> dict:
        return {"rule": "auto", "tolerance_db": self.tolerance_db, "reference": self.reference,
                "min_samples": self.min_samples, "max_samples": self.max_samples}


#: what ``n_samples="auto"`` means
AUTO_SAMPLES = AutoSamples()


def resolve_samples(n_samples) -> tuple[int | None, AutoSamples | None]:
    """``(n, None)`` for a fixed sample count, ``(None, rule)`` for ``"auto"`` / an AutoSamples."""
    if isinstance(n_samples, AutoSamples):
        return None, n_samples
    if n_samples is None or (isinstance(n_samples, str) and n_samples.strip().lower() == "auto"):
        return None, AUTO_SAMPLES
    if isinstance(n_samples, str):
        try:
            n_samples = int(n_samples)
        except ValueError:
            raise InputError(f"n_samples= must be a whole number or 'auto', not {n_samples!r}") \
                from None
    return check_options(n_samples=n_samples)["n_samples"], None


class PosteriorSampler:
    """The bottom-up pass of one 2D image (or of a stack of frames), computed once, and sampling
    from it.

    Parameters
    ----------
    model : HDNModel
        Not changed: when ``device`` differs from the model's, or the network is not yet in the
        layout sampling wants, the sampler works on its own copy of the network.
    image : 2D array in raw intensity units, or a 3D stack of frames (N, Y, X) that share
        ``origin`` (frames of a stack at the same tile): they are sampled together, several
        frames per pass, each drawing exactly the samples it would alone.
    origin : (y, x) of this image within a larger image, multiples of 2**L. Used to key the latent
        noise so that a crop or a tile samples what the full image would.
    device : str or torch.device, optional
        Where to sample (default: where the model is).
    reuse_mb : float
        Memory (MiB) for the top-down states of earlier calls (default 0: none kept). With it, a
        call whose level modes differ from an earlier call's only below some level (same seed,
        scheme and sample indices) starts below the levels they share: toggling level 1 recomputes
        level 1 and the output head, not the levels above. The results are the same either way.
        Only for a 2D image.
    """

    def __init__(self, model, image, origin: tuple[int, int] = (0, 0), device=None,
                 reuse_mb: float = 0.0):
        arr = as_float_array(image)
        if arr.ndim not in (2, 3):
            raise InputError(f"PosteriorSampler takes one 2D image or a stack of frames (N, Y, X), "
                             f"got shape {arr.shape}")
        m = model.config.downscale
        if origin[0] % m or origin[1] % m:
            raise InputError(f"origin {origin} must be a multiple of {m} (2**levels)")
        self.model = model
        self.device = resolve_device(device) if device is not None else model.device
        self.net = inference_model(model, self.device)
        self.stacked = arr.ndim == 3
        self.frames = arr.shape[0] if self.stacked else 1
        self.shape = arr.shape[-2:]
        self.origin = origin
        x = torch.from_numpy(model.normalisation.forward(arr)).to(self.device)
        x = x[:, None] if self.stacked else x[None, None]
        self.x, _ = pad_to_multiple(x, m)
        with torch.inference_mode():
            self.bu = self.net.ladder.bottom_up(self.x)
        budget = 0.0 if self.stacked else max(0.0, float(reuse_mb))
        self._states = _StateCache(int(budget * 2**20))
        #: samples each frame took in the last :meth:`sample` call, and whether a stop ended it;
        #: with the "auto" rule, each frame's estimated MC variance of the MMSE over the rule's
        #: budget at the last check (<= 1: good enough; > 1: the cap ended it)
        self.counts: list[int] = []
        self.mc_ratio: list[float] = []
        self.stopped = False

    def sample(
        self,
        n_samples: int | str | AutoSamples = 100,
        modes=None,
        seed: int = 0,
        batch_size: int | None = None,
        keep_samples: bool = False,
        stop_flag: StopFlag | None = None,
        on_batch=None,
        first_sample: int = 0,
        sampling: str | None = None,
        stop_returns: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Draw posterior samples; return (mmse, variance, samples or None).

        ``n_samples`` is a count, or ``"auto"`` / an :class:`AutoSamples` rule: sampling stops
        per frame when the MMSE is good enough (:attr:`counts` says how many each frame took;
        ``keep_samples`` then keeps the first ``min_samples`` of every frame).
        The cached bottom-up pass is reused; samples are drawn ``batch_size`` at a time (over
        all frames of a stack) without autograd. Sample ``k`` is the same whatever the batch size
        and whichever frames share a pass; ``first_sample`` is the index of the first one, so
        that samples drawn in several calls equal those of one call. ``sampling`` is the
        latent-noise scheme (:data:`SAMPLING_SCHEMES`, default :data:`DEFAULT_SAMPLING`; see
        :class:`LatentNoise`). A stop request raises :class:`StopRequested`; with
        ``stop_returns`` it ends sampling and returns what was drawn (:attr:`stopped` True), unless
        nothing was. ``on_batch(samples)`` is called after each pass with the number of
        samples (over all frames) it drew. For a stack, the results have a leading frame axis
        (after the sample axis for the samples).
        """
        fixed, rule = resolve_samples(n_samples)
        batch_size = check_options(batch_size=batch_size)["batch_size"]
        model = self.net
        modes = model.resolve_modes(modes)
        ladder = model.ladder
        h, w = self.shape
        N = self.frames
        bs = batch_size or _auto_sample_batch(model.config.filters, *self.x.shape[-2:], self.device)
        noise = LatentNoise(seed, scheme=sampling or DEFAULT_SAMPLING)
        cap = rule.max_samples if rule else fixed
        unit = max(2, noise.group) if rule else 1  # independent units of the MC error estimate
        if rule is not None and first_sample % unit:
            raise InputError(f"first_sample must be a multiple of {unit} with the 'auto' rule")
        floor = _auto_floor(rule, noise.scheme) if rule else 0
        n_keep = (floor if rule else fixed) if keep_samples else 0
        acc = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        dev = self.device
        mean = torch.zeros(N, h, w, dtype=acc, device=dev)
        m2 = torch.zeros_like(mean)
        umean = torch.zeros_like(mean) if rule else None
        um2 = torch.zeros_like(mean) if rule else None
        kept = np.empty((n_keep, N, h, w), np.float32) if keep_samples else None
        counts = [0] * N
        self.mc_ratio = [float("nan")] * N
        active = list(range(N))
        count = 0  # samples drawn by every active frame
        norm = model.normalisation
        with keep_heap(dev), torch.inference_mode():
            self.stopped = False
            while active and count < cap:
                if stop_flag is not None and stop_flag.is_set():
                    if not (stop_returns and count >= unit):
                        stop_flag.check()
                    self.stopped = True
                    break
                per = max(1, bs // len(active))
                if rule is not None:
                    per = max(unit, per // unit * unit)
                    # the first pass draws the floor when it fits, later ones up to the batch
                    target = floor if count < floor else cap
                    k = min(per, target - count, cap - count)
                else:
                    k = min(per, cap - count)
                idx = torch.tensor(active, device=dev)
                frames_k = len(active)
                if frames_k == N == 1:
                    bu_k = [b.expand(k, -1, -1, -1) for b in self.bu]
                else:
                    bu_k = [b[idx].repeat_interleave(k, 0) for b in self.bu]

                def eps(level, shape, _first=first_sample + count, _k=k, _f=frames_k):
                    s = 2**level
                    o = (self.origin[0] // s, self.origin[1] // s)
                    e = noise.region(level, _first, (_k, *shape[1:]), o)
                    return (e if _f == 1 else e.repeat(_f, 1, 1, 1)).to(dev)

                key = (seed, noise.scheme, first_sample + count, k)
                start = self._states.find(key, modes) if N == 1 else None
                keep = self._states.keeper(key, modes) if N == 1 else None
                s, _ = ladder.top_down(bu_k, modes, eps, compute_kl=False, start=start, keep=keep)
                s = norm.inverse(s[:, 0, :h, :w]).to(acc).view(frames_k, k, h, w)
                # Chan et al. parallel update of mean and sum of squared deviations
                _merge(mean, m2, idx, s, count, frames_k == N)
                if rule is not None:
                    u = s.view(frames_k, k // unit, unit, h, w).mean(2)
                    _merge(umean, um2, idx, u, count // unit, frames_k == N)
                if kept is not None and count < n_keep:
                    j = min(k, n_keep - count)
                    kept[count : count + j, active] = s[:, :j].transpose(0, 1).float().cpu().numpy()
                count += k
                if on_batch is not None:
                    on_batch(frames_k * k)
                if rule is None or count < floor:
                    continue
                units = count // unit
                post = (m2[idx] / count).mean((1, 2))
                mc = (um2[idx] / (units - 1)).mean((1, 2)) / units
                budget = post * rule.factor
                ratio = torch.where(budget > 0, mc / budget.clamp(min=1e-30),
                                    torch.zeros_like(mc))
                done = (mc <= budget) | (count >= cap)
                for f, d, r in zip(list(active), done.tolist(), ratio.tolist()):
                    self.mc_ratio[f] = float(r)
                    if d:
                        counts[f] = count
                        active.remove(f)
        for f in active:
            counts[f] = count
        self.counts = counts
        var = torch.stack([m2[f] / counts[f] for f in range(N)])
        mu, var = mean.float().cpu().numpy(), var.float().cpu().numpy()
        if not self.stacked:
            return mu[0], var[0], None if kept is None else kept[:, 0]
        return mu, var, kept


def _auto_floor(rule: AutoSamples, scheme: str) -> int:
    """The fewest samples the rule draws: ``min_samples`` rounded up to whole units (antithetic
    pairs, stratified groups), two units at least (a variance needs two), at most the cap."""
    unit = max(2, {"independent": 1, "antithetic": 2, "stratified": _STRATA}[scheme])
    return min(rule.max_samples, max(2 * unit, -(-rule.min_samples // unit) * unit))


def _merge(mean, m2, idx, s, count: int, whole: bool) -> None:
    """Merge a batch ``s`` (frames, k, h, w) of the frames ``idx`` (each with ``count`` earlier
    values) into their running mean and sum of squared deviations (Chan et al.)."""
    k = s.shape[1]
    bmean = s.mean(1)
    bm2 = ((s - bmean[:, None]) ** 2).sum(1)
    mu = mean if whole else mean[idx]
    sq = m2 if whole else m2[idx]
    delta = bmean - mu
    tot = count + k
    mu += delta * (k / tot)
    sq += bm2 + delta**2 * (count * k / tot)
    if not whole:
        mean[idx] = mu
        m2[idx] = sq


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
