"""Prediction: posterior samples, MMSE and variance, with the bottom-up pass computed once.

Sampling noise is keyed to position: the standard-normal draws of level i at latent pixel (y, x) for
sample k depend only on (seed, k, i, y, x). Tiles of a large image therefore draw exactly the noise
the whole image would, and a tiled prediction equals an untiled one wherever the tile overlap covers
the network's receptive field. It also makes results independent of the sample batch size.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.arrays import as_float_array, check_axes, image_array
from ..data.frames import check_saturation
from ..device import resolve_device
from ..errors import HDNWarning, InputError, StopRequested
from ..events import Callback, EventKind, EventTask, Reporter, StopFlag
from ..heap import keep_heap
from ..network.fastpath import fuse_for_inference
from ..network.ladder import pad_to_multiple
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


def available_memory(device=None) -> int | None:
    """Bytes that can still be allocated on ``device`` (None: the CPU), or None when unknown.

    A GPU: what CUDA reports free plus what torch holds in reserve. The CPU: the kernel's
    ``MemAvailable`` (Linux), at most what the process's cgroup (a container, a SLURM job) has
    left under its limit; elsewhere None (no check is made).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
        except (RuntimeError, AssertionError):
            return None
    if dev.type != "cpu":
        return None
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        return None
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                text = a.read().strip()
                if text != "max" and int(text) < 1 << 60:
                    found.append(max(0, int(text) - int(b.read().strip())))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def inference_model(model, device=None):
    """The model to sample with on ``device``, leaving the caller's model exactly as it was.

    Sampling wants the network on ``device``, in eval mode, with its BatchNorms folded into the
    convolutions (:mod:`.fastpath`: the same numbers with less work) and, on a CPU, channels-last
    (NHWC convolutions are ~1.35x faster for inference with oneDNN, measured). A copy of the
    network is made for that (40 ms for the "fast CPU" preset, 0.2 s for the paper's architecture,
    on one CPU thread); passing the result to :func:`predict` or :class:`PosteriorSampler` again
    makes no further copy.
    """
    from ..network.multichannel import MultiChannelModel

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


def as_model(model):
    """An HDNModel as it is; a path is loaded (so ``napari_hdn.predict("m.hdn", image)`` works)."""
    import os

    from ..network.loading import load_model
    from ..network.model import HDNModel
    from ..network.multichannel import MultiChannelModel

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
    n_samples: int | str | AutoSamples = "auto",
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
    keep_finished: bool = False,
    on_frames=None,
    _check_range: bool = True,
) -> Prediction:
    """Draw posterior samples of a trained HDN and summarise them.

    Parameters
    ----------
    model : HDNModel
    image : ndarray
        Noisy image: YX, or frames (SYX/TYX/ZYX, ...) each restored independently.
    n_samples : int, "auto" or AutoSamples
        Posterior samples per frame; the MMSE is their mean. ``"auto"`` (the default,
        :data:`AUTO_SAMPLES`) draws samples until the MMSE's expected PSNR is within 0.05 dB of
        that of 100 independent samples (the paper's count), at least 8 and at most 100 per frame
        (per tile of a tiled frame): see :class:`AutoSamples`. ``info["samples_per_frame"]`` says
        how many each frame took; with ``return_samples`` the first 8 of each frame are kept. A
        number forces that many for every frame. The variance (the per-pixel uncertainty) of a
        few samples is noisier than the MMSE: for a smooth variance map, force more samples.
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
    keep_finished : bool
        On a stop request, return the frames finished so far (``info["stopped"]`` True,
        ``info["frames_done"]``; the arrays hold the whole first-axis slices done, in order) instead
        of raising :class:`StopRequested`; a single untiled frame returns the samples it has drawn.
        Raises StopRequested only when nothing can be returned.
    on_frames : callable, optional
        ``on_frames(first, stop, mmse, variance, counts, samples)`` after each group of frames
        (indices ``first:stop`` of the flattened frames) is finished, in the worker's thread:
        their MMSE, variance, samples per frame and kept samples (None without
        ``return_samples``); for a model per channel, lists of one array per channel and no
        samples.

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
    from ..data.layout import layout_of
    from ..network.multichannel import MultiChannelModel, check_channels

    model = as_model(model)
    image = image_array(image)  # a tensor's values, a list stacked; a masked array refused
    layout = layout_of(np.shape(image), axes)
    check_channels(model, layout)
    if first_sample == 0 and _check_range:  # once, not again for each round, chunk or channel
        check_saturation(image, "the image")
    if isinstance(model, MultiChannelModel):
        return _predict_channels(
            model, image, layout, n_samples, levels=levels, tile_size=tile_size,
            tile_overlap=tile_overlap, batch_size=batch_size, seed=seed,
            return_samples=return_samples, device=device, callbacks=callbacks,
            stop_flag=stop_flag, first_sample=first_sample, sampling=sampling, tta=tta,
            keep_finished=keep_finished, on_frames=on_frames)
    fixed, rule = resolve_samples(n_samples)
    c = check_options(batch_size=batch_size, tile_size=tile_size, tile_overlap=tile_overlap,
                      seed=seed)
    batch_size, tile_size, tile_overlap, seed = (
        c["batch_size"], c["tile_size"], c["tile_overlap"], c["seed"])
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
    if first_sample == 0 and _check_range:  # once, not again for each round or chunk
        check_training_range(model, arr)
    dev = resolve_device(device) if device is not None else model.device
    net = inference_model(model, dev)  # one copy (if any) for all tiles
    m = model.config.downscale
    frames = arr.reshape(-1, *arr.shape[-2:])
    N = len(frames)
    views = _orientations() if tta else [(lambda a: a, lambda a: a)]
    seeds = [seed if t == 0 else _mix(seed, 0x77A, t) & 0x7FFFFFFF for t in range(len(views))]
    plans = []
    for fwd, _ in views:
        H, W = fwd(frames[:1]).shape[-2:]
        plans.append(_tile_plan(H, W, tile_size, tile_overlap, m))
    tiles = len(plans[0][0]) * len(plans[0][1])
    group = _frames_per_pass(net, plans[0], fixed, rule, batch_size, dev, N, sampling)
    progress = _Progress(Reporter(EventTask.PREDICT, callbacks), N * tiles * len(views), fixed,
                         per_frame=tiles * len(views))
    progress.start()
    n_keep = (fixed if rule is None else _auto_floor(rule, sampling)) if return_samples else 0
    mmse = np.zeros(frames.shape, np.float32)
    var = np.zeros_like(mmse)
    samples = np.empty((n_keep, *frames.shape), np.float32) if return_samples else None
    counts = np.zeros(N, np.float64)
    done_frames = 0
    stopped = False
    partial = None
    with keep_heap(dev):
        try:
            for f0 in range(0, N, group):
                f1 = min(N, f0 + group)
                mu_acc = v_acc = None
                for t, ((fwd, inv), plan) in enumerate(zip(views, plans)):
                    mu, v, smp, cnt = _predict_group(
                        net, fwd(frames[f0:f1]), plan, fixed if rule is None else rule, modes,
                        seeds[t], batch_size, return_samples, dev, stop_flag, first_sample,
                        sampling, progress, partial_ok=keep_finished and N == 1 and tiles == 1
                        and len(views) == 1)
                    if isinstance(cnt, _Partial):
                        partial = (mu, v, smp, cnt.count)
                        raise StopRequested("stopped on request")
                    mu, v = inv(mu), inv(v)
                    counts[f0:f1] += cnt / len(views)
                    if len(views) == 1:
                        mu_acc, v_acc = mu, v
                    else:  # mixture of orientations: mean of means; mean variance + var of means
                        mu64 = mu.astype(np.float64)
                        mu_acc = mu64 if mu_acc is None else mu_acc + mu64
                        v_acc = (v + mu64**2) if v_acc is None else v_acc + v + mu64**2
                    if smp is not None:
                        samples[:, f0:f1] = smp
                if len(views) > 1:
                    mu_acc = mu_acc / len(views)
                    v_acc = np.maximum(v_acc / len(views) - mu_acc**2, 0.0)
                mmse[f0:f1], var[f0:f1] = mu_acc, v_acc
                check_finite_result(mmse[f0:f1], var[f0:f1])
                done_frames = f1
                if on_frames is not None:
                    on_frames(f0, f1, mmse[f0:f1], var[f0:f1], counts[f0:f1].copy(),
                              None if samples is None else samples[:, f0:f1])
        except StopRequested:
            if not keep_finished:
                raise
            stopped = True
    shape = arr.shape
    n_drawn = fixed if rule is None else int(round(counts[:max(done_frames, 1)].max()))
    if stopped:
        if partial is not None:  # a single frame, stopped with some samples drawn
            mu, v, smp, got = partial
            mmse[0], var[0], counts[0], done_frames, n_drawn = mu, v, got, 1, got
            if samples is not None:
                samples = samples[:min(n_keep, got)]
                samples[:, 0] = smp[:len(samples), 0]
            shape_done = shape
        else:
            per_slice = int(np.prod(shape[1:-2])) if len(shape) > 2 else 1
            whole = done_frames // per_slice if len(shape) > 2 else 0
            if whole == 0:
                raise StopRequested("stopped before the first frame was finished")
            done_frames = whole * per_slice
            shape_done = (whole, *shape[1:])
        progress.report(EventKind.STOPPED, step=progress.step, total=progress.total,
                        metrics=progress.metrics())
    else:
        shape_done = shape
        progress.report(EventKind.DONE, step=progress.total, total=progress.total,
                        metrics=progress.metrics())
    k = done_frames if stopped else N
    tile, ys, xs = plans[-1][2], plans[-1][0], plans[-1][1]
    per_frame = [round(float(x), 1) for x in counts[:k]]
    return Prediction(
        mmse=mmse[:k].reshape(shape_done),
        variance=var[:k].reshape(shape_done),
        samples=None if samples is None else samples[:, :k].reshape(len(samples), *shape_done),
        levels=modes,
        n_samples=n_drawn,
        seed=seed,
        info={"axes": ax, "tile_size": tile, "tiles": len(ys) * len(xs), "sampling": sampling,
              "tta": len(views), **({"tta_seeds": seeds} if tta else {}),
              "samples_per_frame": per_frame,
              "samples_rule": rule.describe() if rule else {"rule": "fixed", "n_samples": fixed},
              "frames_per_pass": group, "stopped": stopped, "frames_done": k, "frames": N,
              **({"mc_error_ratio": [round(r, 3) for r in progress.ratios[:k]]}
                 if rule is not None and len(views) == 1 else {})},
    )


def channel_seed(seed: int, channel: int) -> int:
    """The latent-noise seed of ``channel`` (0-based; channel 0 keeps ``seed``): the channels'
    samples do not share their latent noise."""
    return seed if channel == 0 else _mix(seed, 0xC4A, channel) & 0x7FFFFFFF


def _predict_channels(model, image, layout, n_samples, *, callbacks, seed, return_samples,
                      keep_finished=False, on_frames=None, **kwargs) -> Prediction:
    """:func:`predict` of each channel with its own model, put back in the input's layout.

    The frames are predicted in chunks, every channel of a chunk before the next chunk, so that a
    stop (``keep_finished``) keeps the frames finished in every channel."""
    arr = np.asarray(image)
    report = Reporter(EventTask.PREDICT, callbacks)
    n = layout.channels
    views = [np.asarray(layout.channel_view(arr, c)) for c in range(n)]
    H, W = views[0].shape[-2:]
    frame_shape = views[0].shape
    flat = [v.reshape(-1, H, W) for v in views]
    N = len(flat[0])
    for c in range(n):  # once per channel, not per chunk
        check_training_range(model.models[c], flat[c])
    fixed, rule = resolve_samples(n_samples)
    chunk = max(1, min(N, 64 if fixed is None else max(1, N // 20)))
    if fixed is None:  # a chunk of a few frames: the ETA and a stop see whole chunks
        chunk = max(1, min(chunk, -(-N // 20)))
    mmse = [np.empty((N, H, W), np.float32) for _ in range(n)]
    var = [np.empty((N, H, W), np.float32) for _ in range(n)]
    kept: list = [None] * n
    counts = np.zeros((n, N))
    t0 = time.perf_counter()
    report.t0 = t0
    report(EventKind.START, step=0, total=N, metrics={"unit": "frame", "frames": N, "channels": n})
    done, stopped, first = 0, False, None
    sub_axes = "SYX"
    try:
        for f0 in range(0, N, chunk):
            f1 = min(N, f0 + chunk)
            for c in range(n):

                def relay(ev, _f0=f0, _k=f1 - f0, _c=c):
                    if ev.kind != EventKind.STEP or not ev.total:
                        return
                    step = _f0 + _k * (_c + ev.step / ev.total) / n  # frames, all channels
                    el = time.perf_counter() - t0
                    metrics = {k: v for k, v in ev.metrics.items() if k != "eta_s"}
                    metrics.update(frames=N, frames_done=_f0, channel=_c, channels=n,
                                   unit="frame")
                    if step > 0:
                        metrics["eta_s"] = el * (N - step) / step
                    report(EventKind.STEP, step=int(step), total=N, metrics=metrics)

                r = predict(model.models[c], flat[c][f0:f1], n_samples, axes=sub_axes,
                            seed=channel_seed(seed, c), return_samples=return_samples,
                            callbacks=relay, _check_range=False, **kwargs)
                first = first or r
                mmse[c][f0:f1], var[c][f0:f1] = r.mmse, r.variance
                counts[c, f0:f1] = r.info["samples_per_frame"]
                if r.samples is not None:
                    if kept[c] is None:
                        kept[c] = np.empty((len(r.samples), N, H, W), np.float32)
                    kept[c][:, f0:f1] = r.samples
            done = f1
            if on_frames is not None:
                on_frames(f0, f1, [m[f0:f1] for m in mmse], [v[f0:f1] for v in var],
                          counts[:, f0:f1].mean(0), None)
    except StopRequested:
        if not keep_finished:
            raise
        stopped = True
    per_slice = int(np.prod(frame_shape[1:-2])) if len(frame_shape) > 2 else 1
    whole = done // per_slice if len(frame_shape) > 2 else (1 if done else 0)
    if whole == 0:
        raise StopRequested("stopped before the first frame was finished")
    k = whole * per_slice
    shape_done = (whole, *frame_shape[1:]) if stopped else frame_shape
    report(EventKind.STOPPED if stopped else EventKind.DONE, step=k, total=N)

    def put(arrs, lead=()):
        return layout.stack([a[..., :k, :, :].reshape(*lead, *shape_done) for a in arrs],
                            len(lead))

    samples = None
    if kept[0] is not None:
        samples = put(kept, (len(kept[0]),))
    return Prediction(
        mmse=put(mmse), variance=put(var), samples=samples,
        levels=first.levels, n_samples=int(round(counts[:, :k].max())), seed=seed,
        info={**first.info, "axes": layout.axes, "channels": n,
              "channel_seeds": [channel_seed(seed, c) for c in range(n)],
              "samples_per_frame": [round(float(x), 1) for x in counts[:, :k].mean(0)],
              "samples_per_channel_frame": counts[:, :k].round(1).tolist(),
              "stopped": stopped, "frames_done": k, "frames": N},
    )


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


class _Partial:
    """A single frame's sampling ended by a stop, with ``count`` samples drawn."""

    def __init__(self, count: int) -> None:
        self.count = count


def _frames_per_pass(net, plan, fixed, rule, batch_size, dev, n_frames: int,
                     sampling: str = DEFAULT_SAMPLING) -> int:
    """Frames sampled together: as many as let each draw its first samples (the rule's floor,
    or all of a fixed count) in one pass of the sample batch, at most 64."""
    ys, xs, tile = plan[0], plan[1], plan[2]
    if tile is not None and (len(ys) > 1 or len(xs) > 1):
        th = tw = tile
    else:
        th, tw = plan[3][0][1], plan[4][0][1]
    m = net.config.downscale
    th, tw = -(-th // m) * m, -(-tw // m) * m
    bs = batch_size or _auto_sample_batch(net.config.filters, th, tw, dev)
    first = _auto_floor(rule, sampling) if rule is not None else fixed
    return int(max(1, min(64, n_frames, bs // max(1, first))))


def _predict_group(net, frames, plan, n_or_rule, modes, seed, batch_size, return_samples, dev,
                   stop_flag, first_sample, sampling, progress, partial_ok=False):
    """MMSE, variance, samples (or None) and samples per frame of a group of frames (sampled
    together, tile by tile). With ``partial_ok`` (one untiled frame) a stop returns what was
    drawn, the counts being a :class:`_Partial`."""
    ys, xs, tile, yr, xr = plan
    n, H, W = frames.shape
    mmse = np.empty(frames.shape, np.float32)
    var = np.empty(frames.shape, np.float32)
    samples = None
    counts = np.zeros(n, np.float64)
    ratios = []
    for y0, (ya, yb) in zip(ys, yr):
        for x0, (xa, xb) in zip(xs, xr):
            y1 = H if tile is None else min(y0 + tile, H)
            x1 = W if tile is None else min(x0 + tile, W)
            sampler = PosteriorSampler(net, frames[:, y0:y1, x0:x1], origin=(y0, x0), device=dev)
            mu, v, smp = sampler.sample(
                n_or_rule, modes, seed, batch_size, return_samples, stop_flag=stop_flag,
                on_batch=progress.drawn, first_sample=first_sample, sampling=sampling,
                stop_returns=partial_ok)
            sl = (slice(None), slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            mmse[:, ya:yb, xa:xb] = mu[sl]
            var[:, ya:yb, xa:xb] = v[sl]
            if smp is not None:
                if samples is None:
                    samples = np.empty((len(smp), *frames.shape), np.float32)
                samples[:, :, ya:yb, xa:xb] = smp[(slice(None), *sl)]
            if sampler.stopped:
                return mmse, var, samples, _Partial(sampler.counts[0])
            counts += np.asarray(sampler.counts, np.float64) / (len(ys) * len(xs))
            ratios.append(sampler.mc_ratio)
            progress.finished(n, sampler.counts)
    progress.ratios.extend(np.nanmax(np.asarray(ratios, np.float64), 0).tolist()
                           if not np.isnan(np.asarray(ratios, np.float64)).all() else [])
    return mmse, var, samples, counts


class _Progress:
    """The "predict" progress events of a prediction: samples drawn (a fixed count), or frames
    (frame-tiles) finished (the "auto" rule, whose sample count is not known in advance), with
    the samples per frame so far and an estimate of the time left (``eta_s``)."""

    def __init__(self, report: Reporter, units: int, fixed: int | None, per_frame: int = 1):
        self.report = report
        self.units = units
        self.per_frame = per_frame  # units (tiles x orientations) per frame
        self.fixed = fixed
        self.total = units * fixed if fixed else units
        self.samples = 0
        self.units_done = 0
        self.counts: list[int] = []
        self.ratios: list[float] = []  # the rule's MC error over its budget, per frame
        self.t_last = None

    @property
    def step(self) -> int:
        return min(self.samples, self.total) if self.fixed else self.units_done

    def start(self) -> None:
        self.report.t0 = time.perf_counter()
        self.report(EventKind.START, step=0, total=self.total, metrics=self.metrics())

    def eta(self) -> float | None:
        now = time.perf_counter() - self.report.t0
        if self.fixed:
            done = self.samples / self.total if self.total else 0.0
            return now * (1 - done) / done if done > 0 else None
        if not self.units_done or self.t_last is None:
            return None
        left = self.t_last / self.units_done * (self.units - self.units_done)
        return max(0.0, left - (now - self.t_last))

    def metrics(self) -> dict:
        m = {"samples_drawn": self.samples, "frames_done": self.units_done // self.per_frame,
             "frames": self.units // self.per_frame,
             "unit": "sample" if self.fixed else ("frame" if self.per_frame == 1 else "tile")}
        if self.counts:
            m["samples_per_frame"] = float(np.mean(self.counts))
        eta = self.eta()
        if eta is not None:
            m["eta_s"] = eta
        return m

    def drawn(self, n: int) -> None:
        self.samples += n
        if self.fixed:
            self.report(EventKind.STEP, step=self.step, total=self.total, metrics=self.metrics())

    def finished(self, n: int, counts) -> None:
        self.units_done += n
        self.counts.extend(int(c) for c in counts)
        self.t_last = time.perf_counter() - self.report.t0
        if not self.fixed:
            self.report(EventKind.STEP, step=self.step, total=self.total, metrics=self.metrics())


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


def predict_in_rounds(model, image, n_samples: int | str | AutoSamples = "auto", *,
                      stop_flag: StopFlag | None = None,
                      callbacks: Callback | list[Callback] | None = None, return_samples: bool = False,
                      **kwargs) -> Prediction:
    """:func:`predict` that keeps what was done when it is stopped.

    With ``n_samples="auto"`` (the default) frames are predicted one group after another, each
    until its MMSE is good enough (:class:`AutoSamples`); a stop keeps the frames finished (whole
    slices of the first axis, ``info["frames_done"]``), or for a single untiled frame the samples
    drawn so far. With a number of samples:

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
    fixed, rule = resolve_samples(n_samples)
    if rule is not None:
        res = predict(model, image, rule, stop_flag=stop_flag, callbacks=callbacks,
                      return_samples=return_samples, keep_finished=True, **kwargs)
        res.info["n_requested"] = "auto"
        return res
    n_samples = fixed
    report = Reporter(EventTask.PREDICT, callbacks)
    device = kwargs.pop("device", None)
    model = inference_model(model, device)  # one copy (if any) for all rounds
    done, mean, m2, kept, last = 0, None, None, None, None
    units = 1  # frames x tiles: the engine counts one step per sample and tile
    stopped = False
    report(EventKind.START, step=0, total=n_samples)
    for k in _round_sizes(int(n_samples)):
        base = done

        def relay(ev, _base=base, _k=k):
            nonlocal units
            if ev.kind == EventKind.START and ev.total:
                units = max(1, ev.total // _k)
            elif ev.kind == EventKind.STEP:
                step = _base + ev.step / units
                el = time.perf_counter() - report.t0
                metrics = {"frames": ev.metrics.get("frames"), "samples_drawn": int(step)}
                if step > 0:
                    metrics["eta_s"] = el * (n_samples - step) / step
                report(EventKind.STEP, step=int(step), total=n_samples, metrics=metrics)

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
    report(EventKind.STOPPED if stopped else EventKind.DONE, step=done, total=n_samples)
    return Prediction(
        mmse=mean.astype(np.float32),
        variance=(m2 / done).astype(np.float32),
        samples=None if kept is None else kept[:done],
        levels=last.levels,
        n_samples=done,
        seed=last.seed,
        info={**last.info, "stopped": stopped, "n_requested": int(n_samples),
              "samples_per_frame": [float(done)] * int(last.info.get("frames", 1)),
              "samples_rule": {"rule": "fixed", "n_samples": int(n_samples)}},
    )
