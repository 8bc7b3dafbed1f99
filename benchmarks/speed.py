"""The benchmark run's speed tasks beyond ``napari-hdn bench`` (napari_hdn/bench.py): prediction
the reference's way (a full forward pass per sample), tiled prediction's memory, and the latency
of a latent-level toggle. Each runs in a fresh process (``napari_hdn.bench._run``) so that peak
memory is per task; ``benchmarks/run.py`` (``speed_section``) calls them."""

from __future__ import annotations

import statistics
import time

from napari_hdn.bench import _peak_memory_mb, _sync


def _untrained(device_name: str, arch: dict):
    import torch

    from napari_hdn.engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation, resolve_device

    dev = resolve_device(device_name)
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**arch), GaussianNoiseModel(0.5), Normalisation(0.0, 1.0)).to(dev)
    return model, dev


def _image(size: int):
    import numpy as np

    return np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)


def task_reference_predict(device_name: str, arch: dict, size: int, n_samples: int) -> dict:
    """An ``n_samples`` MMSE the reference's way: one full forward pass (encoder, both heads, KL)
    per sample, with autograd recording as in its prediction code, the mean accumulated."""
    import torch

    model, dev = _untrained(device_name, arch)
    model.ladder.eval()
    x = torch.from_numpy(_image(size))[None, None].to(dev)
    _sync(dev)
    t = time.perf_counter()
    total = torch.zeros_like(x)
    for _ in range(n_samples):
        s, _ = model.ladder(x)
        total += s.detach()
    _sync(dev)
    return {"seconds": time.perf_counter() - t, "peak_memory_mb": _peak_memory_mb(dev)}


def task_tiled_memory(device_name: str, arch: dict, size: int, tile: int, n_samples: int) -> dict:
    """Peak memory and time of tiled prediction of a ``size`` x ``size`` image."""
    model, dev = _untrained(device_name, arch)
    img = _image(size)
    base = _peak_memory_mb(dev)
    t = time.perf_counter()
    res = model.predict(img, n_samples=n_samples, tile_size=tile)
    _sync(dev)
    return {"seconds": time.perf_counter() - t, "peak_memory_mb": _peak_memory_mb(dev),
            "memory_before_mb": base, "image_mb": img.nbytes / 2**20, "tiles": res.info["tiles"]}


def task_toggle_latency(device_name: str, arch: dict, crop: int, n_samples: int, repeats: int) -> dict:
    """Time to redraw a preview after one latent-level toggle (bottom-up pass cached)."""
    model, dev = _untrained(device_name, arch)
    img = _image(crop)
    t = time.perf_counter()
    sampler = model.sampler(img)
    cache_s = time.perf_counter() - t
    L = arch["levels"]
    modes = [["posterior"] * L, ["prior-mean"] + ["posterior"] * (L - 1)]
    sampler.sample(n_samples, modes[0])
    times = []
    for k in range(repeats):
        t = time.perf_counter()
        sampler.sample(n_samples, modes[(k + 1) % 2])
        _sync(dev)
        times.append(time.perf_counter() - t)
    return {"median_seconds": statistics.median(times), "bottom_up_cache_seconds": cache_s}
