"""How much of a training step is convolution work that no rewrite of the rest can remove.

    python -m benchmarks.step_floor --configs small,paper

One training step of each configuration (``benchmarks.step_speed.CONFIGS``) is run with hooks that
record every convolution call (kind, weights' shape, stride, input shape). Each distinct call is
then timed alone, forward and backward (input and weight gradients, as in training; no input
gradient for the first layer, whose input is the image), on random tensors of the same shapes, with
the heap kept as in training; the count-weighted sum is the step's convolution time. Printed next to
the whole step's median time and the FLOPs of those convolutions, it says how far a step can
shrink by work on everything else (normalisation, activations, gates, the optimiser, Python).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .step_speed import CONFIGS


def _trainer(arch: dict, batch: int):
    from napari_hdn.engine import ModelConfig, PoissonGaussianNoiseModel, Trainer, TrainingConfig

    rng = np.random.default_rng(0)
    img = (100 + rng.poisson(50 + 40 * rng.random((4, 256, 256))) * 2.0).astype(np.float32)
    tc = TrainingConfig(patch_size=64, batch_size=batch, val_fraction=0.0, seed=0, device="cpu",
                        max_steps=10**6)
    return Trainer(img, PoissonGaussianNoiseModel(2.0, 5.0, 100.0), axes="SYX",
                   model_config=ModelConfig(**arch), training_config=tc)


def conv_calls(tr) -> Counter:
    """The convolutions of one training step: Counter of (kind, weight shape, stride, padding,
    output padding, input shape, needs input gradient)."""
    calls: Counter = Counter()
    first_conv = tr.model.ladder.stem[0]  # its input is the image: no input gradient

    def hook(mod, inp, _out):
        kind = "T" if isinstance(mod, nn.ConvTranspose2d) else "C"
        calls[(kind, tuple(mod.weight.shape), mod.stride[0], mod.padding[0],
               getattr(mod, "output_padding", (0,))[0], tuple(inp[0].shape),
               mod is not first_conv)] += 1

    handles = [m.register_forward_hook(hook) for m in tr.model.ladder.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        tr.train_step()
    finally:
        for h in handles:
            h.remove()
    return calls


def _flops(call) -> float:
    kind, w, stride, _pad, _opad, x, grad_in = call
    n, _c, h, wd = x
    if kind == "C":
        out_pixels = n * (h // stride) * (wd // stride)
        macs = out_pixels * w[0] * w[1] * w[2] * w[3]
    else:  # transposed: every input pixel meets the whole kernel
        macs = n * h * wd * w[0] * w[1] * w[2] * w[3]
    return 2.0 * macs * (3 if grad_in else 2)  # forward, weight gradient, input gradient


def time_call(call, reps: int) -> float:
    """Median seconds of one forward + backward of this convolution alone."""
    kind, w, stride, pad, opad, x, grad_in = call
    xt = torch.randn(*x, requires_grad=grad_in)
    wt = torch.randn(*w, requires_grad=True)
    bt = torch.randn(w[1] if kind == "T" else w[0], requires_grad=True)

    def once():
        if kind == "C":
            y = F.conv2d(xt, wt, bt, stride=stride, padding=pad)
        else:
            y = F.conv_transpose2d(xt, wt, bt, stride=stride, padding=pad, output_padding=opad)
        y.backward(torch.ones_like(y))

    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    from napari_hdn.engine.heap import keep_heap

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,paper")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="whole steps timed (median)")
    ap.add_argument("--reps", type=int, default=5, help="timings of each distinct convolution")
    ap.add_argument("--detail", type=int, default=0, help="list the N costliest convolutions")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for name in a.configs.split(","):
        arch, batch = CONFIGS[name]
        tr = _trainer(arch, batch)
        tr.model.ladder.train()
        with keep_heap():
            tr.train_step()
            calls = conv_calls(tr)
            steps = []
            for _ in range(a.steps):
                t = time.perf_counter()
                tr.train_step()
                steps.append(time.perf_counter() - t)
            alone = {c: time_call(c, a.reps) for c in calls}
        conv_s = sum(n * alone[c] for c, n in calls.items())
        step = statistics.median(steps)
        gflop = sum(n * _flops(c) for c, n in calls.items()) / 1e9
        print(f"{name:6s} batch {batch:3d}: step {step:.3f} s (median of {a.steps}); "
              f"{sum(calls.values())} convolution calls, {gflop:.1f} GFLOP, alone {conv_s:.3f} s "
              f"({gflop / conv_s:.0f} GFLOP/s) = {100 * conv_s / step:.0f}% of the step; "
              f"everything else {step - conv_s:.3f} s")
        for c in sorted(calls, key=lambda c: -calls[c] * alone[c])[: a.detail]:
            kind, w, stride, _p, _o, x, _g = c
            print(f"    {calls[c]:3d} x {'transposed ' if kind == 'T' else ''}conv {w[2]}x{w[3]} "
                  f"{w[1] if kind == 'C' else w[0]}->{w[0] if kind == 'C' else w[1]} "
                  f"stride {stride} on {x}: {1e3 * alone[c]:.2f} ms each, "
                  f"{_flops(c) / alone[c] / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
