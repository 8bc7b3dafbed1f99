"""A small Noise2Void denoiser: the built-in way to bootstrap a noise model without calibration data.

Noise2Void trains a U-Net on the noisy images alone. In every training patch a few pixels (2 % by
default, one per cell of a regular grid) are "masked": their value is replaced by that of a random
other pixel of their 5x5 neighbourhood, and the loss (mean squared error) is computed on the masked
pixels only. The network cannot see the noise of a pixel it has to predict, so for pixel-wise
independent noise it learns the expected clean value: a pseudo-clean image for noise-model fitting
(PPN2V's bootstrap), and a denoising baseline in its own right.

The network is deliberately small (depth 2, 16 base filters by default, no normalisation layers)
so that it trains in a minute or two on a laptop CPU. Prediction is tiled with overlapping,
centre-cropped tiles aligned to the pooling grid, so tiled and untiled results agree to float
rounding.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..data.arrays import PatchSampler, augment_batch, to_frames
from ..device import resolve_device
from ..errors import InputError, StopRequested
from ..events import EventKind, EventTask, Reporter, StopFlag
from ..files.safeio import read_file, write_file

N2V_FILE_FORMAT = "napari-hdn-n2v"
N2V_FILE_VERSION = 1


@dataclass
class N2VConfig:
    """Network and training settings of the blind-spot U-Net (all have working defaults).

    Training ends when the masked validation loss has levelled off, whatever the machine's speed:
    after ``patience`` evaluations (every ``eval_every`` steps) without a relative improvement of
    ``min_improvement``, the learning rate halves; the plateau after ``lr_drops`` halvings ends
    training. ``max_steps`` and ``time_budget_s`` are caps; a run they end before the loss has
    levelled off says so (``info["converged"]`` is False, ``info["stop_reason"]`` why).
    """

    depth: int = 2
    filters: int = 16
    batchnorm: bool = True
    patch_size: int = 64
    batch_size: int = 16
    mask_fraction: float = 0.02
    neighbourhood: int = 5
    lr: float = 4e-3
    max_steps: int = 4000
    time_budget_s: float | None = None
    eval_every: int = 50
    patience: int = 3
    lr_drops: int = 2
    min_improvement: float = 0.002
    val_patches: int = 64
    augment: bool = True

    def validate(self) -> None:
        if not 1 <= self.depth <= 4:
            raise InputError(f"n2v depth must be 1..4, got {self.depth}")
        if (self.filters < 1 or self.batch_size < 1 or self.max_steps < 1 or self.eval_every < 1
                or self.patience < 1 or self.lr_drops < 0 or self.val_patches < 1):
            raise InputError("n2v filters, batch_size, max_steps, eval_every, patience and "
                             "val_patches must be positive (lr_drops at least 0)")
        if not 0 < self.mask_fraction <= 0.25:
            raise InputError(f"n2v mask_fraction must be in (0, 0.25], got {self.mask_fraction}")
        if self.neighbourhood < 3 or self.neighbourhood % 2 == 0:
            raise InputError(f"n2v neighbourhood must be odd and >= 3, got {self.neighbourhood}")
        if not self.lr > 0:
            raise InputError(f"n2v lr must be positive, got {self.lr}")
        if not 0 <= self.min_improvement < 1:
            raise InputError(f"n2v min_improvement must be in [0, 1), got {self.min_improvement}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise InputError(f"n2v time_budget_s must be positive, got {self.time_budget_s}")


def _block(cin: int, cout: int, batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a in (cin, cout):
        layers.append(nn.Conv2d(a, cout, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BlindSpotUNet(nn.Module):
    """Plain U-Net (conv-ReLU blocks, max-pooling, transposed-conv upsampling, skip concat).

    The blind spot comes from the masking scheme used in training, not from the architecture.
    Input sides must be multiples of ``2**depth``.
    """

    def __init__(self, depth: int = 2, filters: int = 16, batchnorm: bool = True):
        super().__init__()
        self.depth = depth
        ch = [filters * 2**d for d in range(depth + 1)]
        self.down = nn.ModuleList([_block(1 if d == 0 else ch[d - 1], ch[d], batchnorm)
                                   for d in range(depth)])
        self.bottom = _block(ch[depth - 1], ch[depth], batchnorm)
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[d + 1], ch[d], 2, stride=2)
                                 for d in reversed(range(depth))])
        self.dec = nn.ModuleList([_block(2 * ch[d], ch[d], batchnorm) for d in reversed(range(depth))])
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for blk in self.down:
            x = blk(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)

    @property
    def multiple(self) -> int:
        return 2**self.depth

    @property
    def halo(self) -> int:
        """Margin (pixels) beyond which the output no longer depends on the input."""
        return 12 * 2**self.depth


def blind_spot_mask(shape, fraction: float, neighbourhood: int, gen: torch.Generator):
    """Masked pixel coordinates and their replacement coordinates for a batch of patches.

    One pixel per cell of a grid of side ``1/sqrt(fraction)`` (stratified sampling); each is
    replaced by a random *other* pixel of its ``neighbourhood x neighbourhood`` window (an offset
    that would leave the patch is mirrored; never the pixel itself). Returns flat index tensors
    ``(b, y, x, ny, nx)``.
    """
    b, _, h, w = shape
    if min(h, w) <= neighbourhood:
        raise InputError(f"patches of {h}x{w} are too small for a {neighbourhood}x{neighbourhood} mask")
    g = max(2, int(round(1.0 / math.sqrt(fraction))))
    gy, gx = torch.meshgrid(torch.arange(0, h, g), torch.arange(0, w, g), indexing="ij")
    gy, gx = gy.reshape(-1), gx.reshape(-1)
    n = gy.numel()
    y = gy[None] + torch.randint(0, g, (b, n), generator=gen)
    x = gx[None] + torch.randint(0, g, (b, n), generator=gen)
    keep = (y < h) & (x < w)
    bi = torch.arange(b)[:, None].expand(b, n)[keep]
    y, x = y[keep], x[keep]
    r = neighbourhood // 2
    offsets = torch.tensor([(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                            if (dy, dx) != (0, 0)])
    o = offsets[torch.randint(0, len(offsets), (y.numel(),), generator=gen)]

    def move(v, d, size):  # an offset that would leave the patch is mirrored (still non-zero)
        t = v + d
        return torch.where((t < 0) | (t > size - 1), v - d, t)

    return bi, y, x, move(y, o[:, 0], h), move(x, o[:, 1], w)


def _as_frames(images, name: str):
    """(list of 2D float32 frames, the input as an array or None if it was a list)."""
    if isinstance(images, (list, tuple)):
        return to_frames(list(images), None, name=name), None
    arr = np.asarray(images)
    if arr.ndim not in (2, 3):
        raise InputError(
            f"{name}: expected a 2D image, a stack (S, Y, X) or a list of 2D images; got shape {arr.shape}"
        )
    return to_frames(arr, "YX" if arr.ndim == 2 else "SYX", name=name), arr


def _masked_batch(batch: torch.Tensor, cfg: N2VConfig, gen: torch.Generator):
    bi, y, x, ny, nx = blind_spot_mask(batch.shape, cfg.mask_fraction, cfg.neighbourhood, gen)
    inp = batch.clone()
    inp[bi, 0, y, x] = batch[bi, 0, ny, nx]
    return inp, (bi, y, x), batch[bi, 0, y, x]


class N2VDenoiser:
    """A trained blind-spot U-Net with its normalisation; call :meth:`predict`."""

    def __init__(self, net: BlindSpotUNet, mean: float, std: float, config: N2VConfig,
                 info: dict | None = None):
        self.net = net.cpu().eval()
        self.mean, self.std = float(mean), float(std)
        self.config = config
        self.info = dict(info or {})

    @torch.no_grad()
    def predict(self, images, tile_size: int = 256, tile_overlap: int | None = None,
                device: str | torch.device | None = "auto", callbacks=None):
        """Denoise a 2D image, a stack ``(S, Y, X)``, or a list of 2D images.

        Returns the same structure (float32). Frames larger than ``tile_size`` are processed in
        tiles whose borders (``tile_overlap`` on each side, default the network's receptive
        halo) are discarded, so the result equals untiled prediction up to float rounding.
        """
        frames, arr = _as_frames(images, "image to denoise")
        is_list = arr is None
        dev = resolve_device(device)
        net = self.net.to(dev)
        report = Reporter(EventTask.N2V_PREDICT, callbacks)
        try:
            out = []
            report(EventKind.START, step=0, total=len(frames))
            for k, f in enumerate(frames):
                out.append(self._predict_frame(net, f, tile_size, tile_overlap, dev))
                report(EventKind.STEP, step=k + 1, total=len(frames))
            report(EventKind.DONE, step=len(frames), total=len(frames))
        finally:
            self.net.cpu()
        if is_list:
            return out
        return out[0] if arr.ndim == 2 else np.stack(out)

    def _predict_frame(self, net, frame, tile_size, overlap, dev) -> np.ndarray:
        m = net.multiple
        halo = net.halo if overlap is None else int(overlap)
        halo = -(-halo // m) * m
        tile = max(m, (int(tile_size) // m) * m)
        h, w = frame.shape
        ph, pw = -(-h // m) * m, -(-w // m) * m
        x = (frame - self.mean) / self.std
        x = np.pad(x, ((0, ph - h), (0, pw - w)), mode="reflect" if min(h, w) > 1 else "edge")
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out = np.empty((ph, pw), np.float32)
        for y0 in range(0, ph, tile):
            for x0 in range(0, pw, tile):
                y1, x1 = min(y0 + tile, ph), min(x0 + tile, pw)
                a0, b0 = max(0, y0 - halo), max(0, x0 - halo)
                a1, b1 = min(ph, y1 + halo), min(pw, x1 + halo)
                pred = net(xt[a0:a1, b0:b1][None, None].to(dev))[0, 0].cpu().numpy()
                out[y0:y1, x0:x1] = pred[y0 - a0 : y1 - a0, x0 - b0 : x1 - b0]
        return out[:h, :w] * self.std + self.mean

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the network, normalisation and settings to one safetensors file."""
        meta = {"format": N2V_FILE_FORMAT, "format_version": N2V_FILE_VERSION,
                "config": asdict(self.config), "mean": self.mean, "std": self.std, "info": self.info}
        write_file(path, dict(self.net.state_dict()), meta)

    def __repr__(self):
        c = self.config
        return f"N2VDenoiser(depth={c.depth}, filters={c.filters}, steps={self.info.get('steps')})"


def load_n2v(path: str | os.PathLike) -> N2VDenoiser:
    """Load a denoiser written by :meth:`N2VDenoiser.save`."""
    from ..errors import ModelFileError

    meta, tensors = read_file(path, N2V_FILE_FORMAT, "napari-hdn Noise2Void")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > N2V_FILE_VERSION:
        raise ModelFileError(f"{path} is from a newer napari-hdn (N2V format {meta.get('format_version')})")
    try:
        cfg = N2VConfig(**meta["config"])
        net = BlindSpotUNet(cfg.depth, cfg.filters, cfg.batchnorm)
        net.load_state_dict(tensors)
        return N2VDenoiser(net, meta["mean"], meta["std"], cfg, meta.get("info", {}))
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: invalid Noise2Void file ({exc})") from None


@torch.no_grad()
def _val_loss(net, val, dev) -> float:
    inp, idx, target = val
    pred = net(inp.to(dev))
    bi, y, x = idx
    return float(((pred[bi, 0, y, x].cpu() - target) ** 2).mean())


class _Plateau:
    """The stopping rule of :func:`train_n2v`: after ``patience`` evaluations without a relative
    improvement of ``min_improvement`` the rate halves; the plateau after ``lr_drops`` halvings
    ends training."""

    def __init__(self, cfg: N2VConfig) -> None:
        self.cfg, self.lr = cfg, cfg.lr
        self.best, self.waited, self.drops, self.done = math.inf, 0, 0, False

    def update(self, val: float) -> None:
        if val < self.best * (1.0 - self.cfg.min_improvement):
            self.best, self.waited = val, 0
            return
        self.waited += 1
        if self.waited >= self.cfg.patience:
            if self.drops >= self.cfg.lr_drops:
                self.done = True
            else:
                self.drops, self.lr, self.waited = self.drops + 1, self.lr * 0.5, 0


def train_n2v(
    images,
    *,
    config: N2VConfig | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    callbacks=None,
    stop_flag: StopFlag | None = None,
    **overrides,
) -> N2VDenoiser:
    """Train a Noise2Void blind-spot U-Net on noisy images (no clean data needed).

    Parameters
    ----------
    images : array (Y, X) or (S, Y, X), or list of 2D arrays
        The noisy data (each frame at least 16x16 pixels).
    config : N2VConfig, optional
        Settings; keyword ``overrides`` (e.g. ``max_steps=500``, ``time_budget_s=60``,
        ``filters=8``) replace single fields.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    seed : int
        Seeds weights, patches and masks (same seed, same result on the same machine).
    callbacks : callable or list, optional
        Receive :class:`ProgressEvent` s with task ``"n2v"``: ``start``, ``step`` (``train_loss``,
        ``lr``, and ``val_loss`` every ``eval_every`` steps), ``done`` or ``stopped``.
    stop_flag : StopFlag, optional
        Checked before every step; a stop keeps the best weights so far.

    Returns
    -------
    N2VDenoiser
        With ``info``: ``steps``, ``best_val_loss``, ``stopped``, ``seconds``, ``converged``
        (the validation loss levelled off), ``stop_reason`` (``"converged"``, ``"max_steps"``,
        ``"time_budget"`` or ``"stopped"``), ``lr_drops``.

    Notes
    -----
    Training ends when the validation loss has levelled off (see :class:`N2VConfig`): a count of
    steps, so the result does not depend on how busy the machine is. ``max_steps`` and
    ``time_budget_s`` are caps. The weights kept are those with the lowest masked loss on a fixed
    set of validation patches (fixed masks); the masked pixels are never seen by the network, so
    this loss is an honest estimate even on patches from the training images. On the CPU the
    thread count adapts to a busy machine (:class:`~napari_hdn.engine.threads.ThreadGovernor`).
    """
    from ..threads import BusyMonitor, ThreadGovernor

    cfg = N2VConfig(**{**asdict(config or N2VConfig()), **overrides})
    cfg.validate()
    frames, _ = _as_frames(images, "noisy image")
    flat = np.concatenate([f.ravel() for f in frames]).astype(np.float64)
    mean, std = float(flat.mean()), float(flat.std())
    del flat
    if not std > 0:
        raise InputError("the noisy images are constant: there is nothing to denoise or to learn from")
    m = 2**cfg.depth
    side = min(min(f.shape) for f in frames)
    patch = min(cfg.patch_size, side) // m * m
    if patch < max(16, m):
        raise InputError(
            f"images of {side} pixels are too small for Noise2Void with depth {cfg.depth}: need at "
            f"least {max(16, m)} pixels per side"
        )
    norm = [((f - mean) / std).astype(np.float32) for f in frames]
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = BlindSpotUNet(cfg.depth, cfg.filters, cfg.batchnorm)
    net = net.to(dev)
    sampler = PatchSampler(norm, patch, gen)
    val_gen = torch.Generator().manual_seed(int(seed) + 12345)
    val_batch = PatchSampler(norm, patch, val_gen).sample(cfg.val_patches)
    val = _masked_batch(val_batch, cfg, val_gen)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    report = Reporter(EventTask.N2V, callbacks)
    rule = _Plateau(cfg)
    t0 = time.perf_counter()
    best = _val_loss(net, val, dev)
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    report(EventKind.START, step=0, total=cfg.max_steps, metrics={"val_loss": best})
    step, reason = 0, "max_steps"
    threads_before = torch.get_num_threads()
    governor = ThreadGovernor(threads_before) if dev.type == "cpu" else None
    busy = BusyMonitor() if dev.type == "cpu" else None
    t_last = time.perf_counter()
    try:
        for step in range(1, cfg.max_steps + 1):
            if stop_flag is not None:
                stop_flag.check()
            if cfg.time_budget_s and time.perf_counter() - t0 >= cfg.time_budget_s:
                step, reason = step - 1, "time_budget"
                break
            for g in opt.param_groups:
                g["lr"] = rule.lr
            batch = sampler.sample(cfg.batch_size)
            if cfg.augment:
                batch = augment_batch(batch, gen)
            inp, (bi, y, x), target = _masked_batch(batch, cfg, gen)
            net.train()
            pred = net(inp.to(dev))
            loss = ((pred[bi, 0, y, x] - target.to(dev)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            metrics = {"train_loss": float(loss.detach()), "lr": rule.lr}
            said = busy.poll() if busy is not None else None
            if said:
                metrics["busy"] = (said + "; Noise2Void stops when its validation loss levels "
                                   "off, not on the clock, so its result is the same, only later"
                                   + (" (unless the time limit ends it first)"
                                      if cfg.time_budget_s else ""))
            if governor is not None:
                now = time.perf_counter()
                governor.observe(now - t_last)
                t_last = now
            if step % cfg.eval_every == 0:
                net.eval()
                v = _val_loss(net, val, dev)
                metrics["val_loss"] = v
                if v < best:
                    best = v
                    best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
                rule.update(v)
                t_last = time.perf_counter()  # evaluations are not steps
            report(EventKind.STEP, step=step, total=cfg.max_steps, metrics=metrics)
            if rule.done:
                reason = "converged"
                break
    except StopRequested:
        step, reason = step - 1, "stopped"
    finally:
        torch.set_num_threads(threads_before)
    net.eval()
    last = _val_loss(net, val, dev)
    if last < best:
        best, best_state = last, {k: t.detach().clone() for k, t in net.state_dict().items()}
    net.load_state_dict(best_state)
    stopped = reason == "stopped"
    info = {"steps": step, "best_val_loss": best, "stopped": stopped,
            "seconds": round(time.perf_counter() - t0, 3), "patch_size": patch, "seed": int(seed),
            "converged": reason == "converged", "stop_reason": reason, "lr_drops": rule.drops,
            "max_steps": cfg.max_steps, "time_budget_s": cfg.time_budget_s,
            "other_load": None if busy is None or busy.load is None else round(busy.load, 2)}
    report(EventKind.STOPPED if stopped else EventKind.DONE, step=step, total=cfg.max_steps,
           metrics={"val_loss": best, "stop_reason": reason})
    return N2VDenoiser(net, mean, std, cfg, info)
