"""Speed and memory benchmark of the engine (``napari-hdn bench``; also ``benchmarks/speed.py``).

Every figure is measured in this run on this machine, each in a fresh subprocess so that peak
memory is per task. Reported:

- the machine's conv2d throughput (3x3, 64 -> 64 channels, batch 64 at 64x64, forward+backward),
- training optimiser steps/s at the paper configuration (L=6, z=32, F=64, B=5, batch 64, patch 64)
  and at a small CPU configuration, each with one pass and per-chunk ("ghost") BatchNorm statistics
  versus the reference's 8 sequential forward/backward passes of 8, and the fraction of the conv2d
  throughput the training step achieves (convolution FLOPs of a step / step time / conv2d FLOP/s),
- 100-sample MMSE time with the bottom-up pass computed once and samples batched versus one full
  forward pass per sample (as the reference does),
- peak resident memory (CPU) or peak allocated memory (CUDA) of each task.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import statistics
import sys
import time

from .engine.training.presets import PRESETS

#: the architectures timed: the presets' (engine/presets.py)
PAPER = PRESETS["paper"].model
SMALL = PRESETS["fast CPU"].model


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def _median_time(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def conv_flops_per_forward(model, x) -> float:
    """FLOPs of all convolutions in one forward pass of ``model.loss(x)`` (2 per MAC)."""
    import torch

    total = [0.0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.ConvTranspose2d):
            macs = inp[0].numel() * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            macs = out.numel() * k
        total[0] += 2.0 * macs

    handles = [
        m.register_forward_hook(hook)
        for m in model.ladder.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    with torch.no_grad():
        model.loss(x)
    for h in handles:
        h.remove()
    return total[0]


def task_conv(device_name: str, repeats: int) -> dict:
    import torch

    from .engine import resolve_device

    dev = resolve_device(device_name)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dev)
    x = torch.randn(64, 64, 64, 64, device=dev, requires_grad=True)

    def step():
        conv(x).sum().backward()

    step()
    t = _median_time(step, repeats, dev)
    # forward + backward (grad input, grad weight) = 3 convolutions of 64*9 MACs per output element
    flops = 3 * 2.0 * (64 * 9) * (64 * 64 * 64 * 64)
    return {"conv2d_gflops": flops / t / 1e9, "conv2d_seconds": t,
            "peak_memory_mb": _peak_memory_mb(dev)}


def task_train(device_name: str, arch: dict, batch: int, patch: int, mode: str, repeats: int,
               channels_last: bool = False) -> dict:
    """Time optimiser steps; mode 'ghost' (one pass) or 'sequential' (8 passes of batch/8)."""
    import torch

    from .engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation, resolve_device

    dev = resolve_device(device_name)
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**arch), GaussianNoiseModel(0.5), Normalisation(0.0, 1.0)).to(dev)
    chunk = 8
    model.ladder.set_bn_chunk(chunk)
    if channels_last:
        model.ladder.to(memory_format=torch.channels_last)
    opt = torch.optim.Adamax(model.ladder.parameters(), lr=3e-4)
    x = torch.randn(batch, 1, patch, patch, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fwd_flops = conv_flops_per_forward(model, x)
    model.ladder.train()

    def step():
        opt.zero_grad(set_to_none=True)
        if mode == "ghost":
            loss, _, _ = model.loss(x)
            loss.backward()
        else:
            for xb in x.split(chunk):
                loss, _, _ = model.loss(xb)
                (loss * xb.shape[0] / batch).backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    t = _median_time(step, repeats, dev)
    return {"steps_per_s": 1.0 / t, "step_seconds": t, "train_gflops": 3 * fwd_flops / t / 1e9,
            "conv_gflop_per_step": 3 * fwd_flops / 1e9, "peak_memory_mb": _peak_memory_mb(dev)}


def task_predict(device_name: str, arch: dict, size: int, n_samples: int, reuse: bool) -> dict:
    import numpy as np
    import torch

    from .engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation, resolve_device

    dev = resolve_device(device_name)
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**arch), GaussianNoiseModel(0.5), Normalisation(0.0, 1.0)).to(dev)
    model.ladder.eval()
    img = np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)
    _sync(dev)
    t = time.perf_counter()
    if reuse:
        sampler = model.sampler(img)
        sampler.sample(n_samples)
    else:
        # the reference's way: one full forward pass (encoder, both heads, KL) per sample, with
        # autograd recording as in its prediction code, accumulating the mean on the fly
        x = torch.from_numpy(img)[None, None].to(dev)
        total = torch.zeros_like(x)
        for _ in range(n_samples):
            s, _ = model.ladder(x)
            total += s.detach()
    _sync(dev)
    return {"seconds": time.perf_counter() - t, "peak_memory_mb": _peak_memory_mb(dev)}


def _run(fn, *args, **kwargs) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def run_speed_benchmark(quick: bool = False, device: str = "auto", json_out: str | None = None,
                        echo=print) -> dict:
    """Run the benchmark and print a report; returns the figures."""
    import torch

    from .engine import resolve_device

    dev = resolve_device(device)
    results: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(dev), "python": platform.python_version()},
        "quick": quick,
    }
    reps = 3 if quick else 5
    echo(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    conv = _run(task_conv, str(dev), reps)
    results["conv2d"] = conv
    echo(f"conv2d 3x3 64ch fwd+bwd (batch 64, 64x64): {conv['conv2d_gflops']:.1f} GFLOP/s")

    configs = [("small", SMALL, 64, 64)]
    if not quick:
        configs.append(("paper", PAPER, 64, 64))
    results["training"] = {}
    for name, arch, batch, patch in configs:
        for mode in ("ghost", "sequential"):
            r = _run(task_train, str(dev), arch, batch, patch, mode, 2 if name == "paper" else reps)
            r["fraction_of_conv2d"] = r["train_gflops"] / conv["conv2d_gflops"]
            results["training"][f"{name}/{mode}"] = r
            echo(f"train {name:5s} {mode:10s}: {r['steps_per_s']:.3f} steps/s "
                 f"({r['step_seconds']:.2f} s/step, {r['train_gflops']:.1f} GFLOP/s = "
                 f"{100 * r['fraction_of_conv2d']:.0f}% of conv2d), peak {r['peak_memory_mb']:.0f} MB")
        g, s = results["training"][f"{name}/ghost"], results["training"][f"{name}/sequential"]
        echo(f"  one pass with ghost BatchNorm vs 8 sequential passes: "
             f"{g['steps_per_s'] / s['steps_per_s']:.2f}x")

    results["prediction"] = {}
    pred_cfgs = [("small", SMALL, 128 if quick else 256)]
    if not quick:
        pred_cfgs.append(("paper", PAPER, 128))
    n = 100
    for name, arch, size in pred_cfgs:
        reuse = _run(task_predict, str(dev), arch, size, n, True)
        recompute = _run(task_predict, str(dev), arch, size, n, False)
        ratio = recompute["seconds"] / reuse["seconds"]
        results["prediction"][name] = {"size": size, "n_samples": n, "reuse": reuse,
                                       "recompute": recompute, "speedup": ratio}
        echo(f"predict {name:5s} {n} samples {size}x{size}: {reuse['seconds']:.1f} s (bottom-up once, "
             f"batched, no autograd) vs {recompute['seconds']:.1f} s (a full forward pass per sample) "
             f"= {ratio:.1f}x; peak {reuse['peak_memory_mb']:.0f} vs "
             f"{recompute['peak_memory_mb']:.0f} MB")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def task_tiled_memory(device_name: str, arch: dict, size: int, tile: int, n_samples: int) -> dict:
    """Peak memory and time of tiled prediction of a ``size`` x ``size`` image."""
    import numpy as np
    import torch

    from .engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation, resolve_device

    dev = resolve_device(device_name)
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**arch), GaussianNoiseModel(0.5), Normalisation(0.0, 1.0)).to(dev)
    img = np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)
    base = _peak_memory_mb(dev)
    t = time.perf_counter()
    res = model.predict(img, n_samples=n_samples, tile_size=tile)
    _sync(dev)
    return {"seconds": time.perf_counter() - t, "peak_memory_mb": _peak_memory_mb(dev),
            "memory_before_mb": base, "image_mb": img.nbytes / 2**20, "tiles": res.info["tiles"]}


def task_toggle_latency(device_name: str, arch: dict, crop: int, n_samples: int, repeats: int) -> dict:
    """Time to redraw a preview after one latent-level toggle (bottom-up pass cached)."""
    import numpy as np
    import torch

    from .engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation, resolve_device

    dev = resolve_device(device_name)
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**arch), GaussianNoiseModel(0.5), Normalisation(0.0, 1.0)).to(dev)
    img = np.random.default_rng(0).normal(size=(crop, crop)).astype(np.float32)
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
