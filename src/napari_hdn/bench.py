"""``napari-hdn bench``: how fast training and prediction run on this machine.

It times the code a user runs, not a copy of it: :meth:`Trainer.train_step
<napari_hdn.engine.training.Trainer.train_step>` with a preset's architecture and training settings
(patch sampling, augmentation, micro-batches, Adamax, the weight average), and
:func:`~napari_hdn.engine.predict` of a 100-sample MMSE. Every figure is measured in this run, each
task in a fresh subprocess so that peak memory is per task. Reported:

- the machine's conv2d throughput (3x3, 64 -> 64 channels, batch 64 at 64x64, forward+backward),
- training steps/s of the "fast CPU" preset and (without ``--quick``) the "paper" one, and the
  fraction of the conv2d throughput a step achieves (convolution FLOPs / step time / conv2d FLOP/s),
- the time of a 100-sample MMSE with each of those architectures,
- peak resident memory (CPU) or peak allocated memory (CUDA) of each task.

The weights are untrained (a step or a sample costs the same whatever the weights).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import statistics
import sys
import time

from .engine.training.presets import PRESETS

#: the presets timed (engine/presets.py); --quick times the first only
TIMED_PRESETS = ("fast CPU", "paper")


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


def task_train(device_name: str, arch: dict, training: dict, repeats: int) -> dict:
    """Time :meth:`Trainer.train_step` for the architecture ``arch`` with the training settings
    ``training`` (a preset's), on random frames, from untrained weights."""
    import warnings

    import numpy as np

    from .engine import GaussianNoiseModel, ModelConfig, Trainer, TrainingConfig, resolve_device

    dev = resolve_device(device_name)
    patch = int(training.get("patch_size", TrainingConfig().patch_size))
    side = max(4 * patch, 128)
    frames = np.random.default_rng(0).normal(size=(4, side, side)).astype(np.float32)
    tcfg = TrainingConfig(**{**training, "init": "scratch", "device": str(dev), "seed": 0,
                             "val_fraction": 0.0, "time_budget_s": None})
    with warnings.catch_warnings():  # random frames: the noise-model checks have things to say
        warnings.simplefilter("ignore")
        trainer = Trainer(frames, GaussianNoiseModel(1.0), axes="SYX",
                          model_config=ModelConfig(**arch), training_config=tcfg)
    x = trainer.sampler.sample(tcfg.batch_size).to(dev)
    fwd_flops = conv_flops_per_forward(trainer.model, x)
    trainer.model.ladder.train()

    def step():
        trainer.train_step()
        trainer.step += 1  # as Trainer.run counts them (the warm-up reads it)

    step()  # warm-up (allocator, kernels)
    t = _median_time(step, repeats, dev)
    return {"steps_per_s": 1.0 / t, "step_seconds": t, "train_gflops": 3 * fwd_flops / t / 1e9,
            "conv_gflop_per_step": 3 * fwd_flops / 1e9, "batch_size": tcfg.batch_size,
            "patch_size": patch, "peak_memory_mb": _peak_memory_mb(dev)}


def task_predict(device_name: str, arch: dict, size: int, n_samples: int) -> dict:
    """Time :func:`~napari_hdn.engine.predict` of an ``n_samples`` MMSE of a ``size`` x ``size``
    image with untrained weights of the architecture ``arch``."""
    import warnings

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
    with warnings.catch_warnings():  # random pixels: the noise model's range check has a say
        warnings.simplefilter("ignore")
        model.predict(img, n_samples=n_samples, seed=0, device=str(dev))
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

    names = TIMED_PRESETS[:1] if quick else TIMED_PRESETS
    width = max(len(n) for n in names)
    results["training"] = {}
    for name in names:
        preset = PRESETS[name]
        r = _run(task_train, str(dev), preset.model, preset.training,
                 2 if name == "paper" else reps)
        r["fraction_of_conv2d"] = r["train_gflops"] / conv["conv2d_gflops"]
        results["training"][name] = r
        echo(f"train {name:{width}s} (batch {r['batch_size']}, patch {r['patch_size']}): "
             f"{r['steps_per_s']:.3f} steps/s ({r['step_seconds']:.2f} s/step, "
             f"{r['train_gflops']:.1f} GFLOP/s = {100 * r['fraction_of_conv2d']:.0f}% of conv2d), "
             f"peak {r['peak_memory_mb']:.0f} MB")

    results["prediction"] = {}
    n = 100
    for name in names:
        size = 128 if quick or name == "paper" else 256
        r = _run(task_predict, str(dev), PRESETS[name].model, size, n)
        results["prediction"][name] = {"size": size, "n_samples": n, **r}
        echo(f"predict {name:{width}s} {n} samples {size}x{size}: {r['seconds']:.1f} s, "
             f"peak {r['peak_memory_mb']:.0f} MB")
    if json_out:  # atomically: a stop or a full disk leaves no half-written file
        from .engine.files.safeio import atomic_write

        data = json.dumps(results, indent=2).encode()
        atomic_write(json_out, lambda fh: fh.write(data), "figures file")
    return results
