"""Prediction of whole images and stacks: :func:`predict` (tiles, frames sampled together, the
"auto" sample count, channels, test-time augmentation) and :func:`predict_in_rounds` (samples
in rounds, so that a stop keeps what was drawn)."""

from __future__ import annotations

import time
import warnings

import numpy as np

from ..data.arrays import as_float_array, check_axes, image_array
from ..data.frames import check_saturation
from ..data.layout import layout_of
from ..device import resolve_device
from ..errors import HDNWarning, InputError, StopRequested
from ..events import Callback, EventKind, EventTask, Reporter, StopFlag
from ..heap import keep_heap
from ..network.loading import load_model
from ..network.model import HDNModel
from ..network.multichannel import MultiChannelModel, check_channels
from ..options import check_options
from .sampling import (
    DEFAULT_SAMPLING,
    SAMPLING_SCHEMES,
    AutoSamples,
    PosteriorSampler,
    Prediction,
    _auto_floor,
    _auto_sample_batch,
    _mix,
    inference_model,
    resolve_samples,
)


def as_model(model):
    """An HDNModel as it is; a path is loaded (so ``napari_hdn.predict("m.hdn", image)`` works)."""
    import os


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
