"""Time of a 100-sample-equivalent MMSE: this tree against the reference's way and an old tree.

    python -m benchmarks.mmse_speed --old /work/wt-e1b --configs small,paper --sizes 256,512

Three ways are timed, each in a fresh subprocess whose PYTHONPATH points at one tree's ``src``,
alternating between the trees (old, new, old, new, ...) so that drifts of the machine hit all alike:

- ``reference``: the reference's way in the old tree: one full forward pass per sample (bottom-up
  included), under ``torch.no_grad``, accumulating the mean;
- ``old``: the old tree's ``PosteriorSampler`` (bottom-up once, samples batched);
- ``new``: this tree's ``PosteriorSampler`` with its default latent-noise scheme.

A pass costs the same whatever the weights, so the models are untrained ones of the issue's
architectures. Each child times ``--passes`` single samples (reference) or sample batches
(old/new) after a warm-up; the figures are medians per sample. The 100-sample-equivalent time is
``100 x`` the reference's median per sample, and ``bottom-up + N_eq x`` the median per sample for
the new code, where ``N_eq`` (``--n-eq``) is the number of samples of the default scheme whose MMSE
is as close to the 1000-sample MMSE as 100 independent samples' (measured on trained models by
``benchmarks/mmse_quality.py``). ``--direct`` also times whole 100 / N_eq sample predictions.

Also printed: the fraction of the machine's conv2d throughput the sampling reaches (convolution
FLOPs of one top-down pass / its time / the FLOP/s of a 3x3 64->64 convolution forward pass on
batch 8 at 64x64, channels-last, as sampling runs) and peak resident memory of each child.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from ._child import run_in_tree

CONFIGS = {
    "small": dict(levels=4, z_dim=32, filters=32, blocks=3),  # the small CPU configuration
    "paper": dict(levels=6, z_dim=32, filters=64, blocks=5),
    "fast": dict(levels=4, z_dim=16, filters=32, blocks=2),  # the "fast CPU" preset
}
#: samples of the default scheme that give the MMSE quality of 100 independent samples (measured:
#: docs/benchmarks.md, "MMSE speed"; benchmarks/mmse_quality.py prints it)
N_EQ = 8

_CHILD = r"""
import json, sys, time, resource, statistics
import numpy as np, torch
from napari_hdn.engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation
arch, size, way, passes, batch, threads, direct = json.loads(sys.argv[1])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = HDNModel(ModelConfig(**arch), GaussianNoiseModel(0.5), Normalisation(0.0, 1.0))
model.ladder.eval()
img = np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)
out = {}
if way == "reference":
    x = torch.from_numpy(img)[None, None]
    def one():
        with torch.no_grad():
            s, _ = model.ladder(x)
        return s
    one()
    times = []
    for _ in range(passes):
        t = time.perf_counter(); one(); times.append(time.perf_counter() - t)
    out["per_sample"] = statistics.median(times)
    if direct:
        t = time.perf_counter(); total = torch.zeros_like(x)
        for _ in range(direct):
            total += one()
        out["direct"] = time.perf_counter() - t
else:
    kw = {}
    t = time.perf_counter(); sampler = model.sampler(img); out["bottom_up"] = time.perf_counter() - t
    sampler.sample(batch, batch_size=batch)  # warm-up
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        sampler.sample(batch, batch_size=batch)
        times.append(time.perf_counter() - t)
    out["per_sample"] = statistics.median(times) / batch
    if way == "new":  # convolution FLOPs of one top-down pass
        flops = [0.0]
        def hook(mod, inp, o):
            if isinstance(mod, torch.nn.ConvTranspose2d):
                macs = inp[0].numel() * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
            else:
                macs = o.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            flops[0] += 2.0 * macs
        hs = [m.register_forward_hook(hook) for m in sampler.net.ladder.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        sampler.sample(1, batch_size=1)
        for h in hs:
            h.remove()
        out["conv_flops"] = flops[0]
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval().to(memory_format=torch.channels_last)
        xc = torch.randn(8, 64, 64, 64).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            conv(xc); ts = []
            for _ in range(10):
                t = time.perf_counter(); conv(xc); ts.append(time.perf_counter() - t)
        out["conv2d_gflops"] = 2.0 * 64 * 9 * xc.numel() / statistics.median(ts) / 1e9
    if direct:
        t = time.perf_counter(); model.sampler(img).sample(direct); out["direct"] = time.perf_counter() - t
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def measure(tree, arch, size, way, passes, batch, threads, direct=0) -> dict:
    return run_in_tree(tree, _CHILD, [arch, size, way, passes, batch, threads, direct])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="source tree of the baseline (has src/napari_hdn)")
    ap.add_argument("--new", default=".", help="source tree of the new code")
    ap.add_argument("--configs", default="small,paper")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--rounds", type=int, default=2, help="alternating old/new rounds")
    ap.add_argument("--passes", type=int, default=3, help="timed passes (batches) per child")
    ap.add_argument("--batch", type=int, default=0, help="sample batch (0: the new tree's choice)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-eq", type=int, default=N_EQ)
    ap.add_argument("--direct", action="store_true", help="also time whole predictions")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(a.new).resolve() / "src"))
    from napari_hdn.engine.prediction.sampling import _auto_sample_batch

    print(f"{a.threads} threads; N_eq = {a.n_eq} samples of the new default scheme stand for 100 "
          "independent samples")
    for name in a.configs.split(","):
        arch = CONFIGS[name]
        for size in map(int, a.sizes.split(",")):
            bs = a.batch or _auto_sample_batch(arch["filters"], size, size,
                                               __import__("torch").device("cpu"))
            res: dict[str, list[dict]] = {"reference": [], "old": [], "new": []}
            for _ in range(a.rounds):
                for way, tree in (("reference", a.old), ("old", a.old), ("new", a.new)):
                    d = 0
                    if a.direct:
                        d = a.n_eq if way == "new" else 100
                    res[way].append(measure(tree, arch, size, way, a.passes, bs, a.threads, d))
            med = {w: statistics.median(r["per_sample"] for r in v) for w, v in res.items()}
            bu = {w: statistics.median(r["bottom_up"] for r in v)
                  for w, v in res.items() if w != "reference"}
            peak = {w: max(r["peak_mb"] for r in v) for w, v in res.items()}
            t_ref = 100 * med["reference"]
            t_old = bu["old"] + 100 * med["old"]
            t_new100 = bu["new"] + 100 * med["new"]
            t_new = bu["new"] + a.n_eq * med["new"]
            n = res["new"][0]
            frac = n["conv_flops"] / med["new"] / 1e9 / n["conv2d_gflops"]
            print(f"{name} {arch} {size}x{size}, sample batch {bs}:")
            print(f"  per sample: reference {med['reference']:.3f} s, old {med['old']:.3f} s, "
                  f"new {med['new']:.3f} s ({med['reference'] / med['new']:.2f}x the reference, "
                  f"{med['old'] / med['new']:.2f}x old); bottom-up old {bu['old']:.3f} s, "
                  f"new {bu['new']:.3f} s")
            print(f"  100-sample-equivalent MMSE: reference {t_ref:.1f} s, old {t_old:.1f} s, "
                  f"new 100 samples {t_new100:.1f} s, new {a.n_eq} samples {t_new:.1f} s -> "
                  f"{t_ref / t_new:.2f}x the reference (target 4x: "
                  f"{'met' if t_ref / t_new >= 4 else 'NOT met'}), {t_old / t_new:.2f}x old")
            print(f"  whole-stack throughput ({size}x{size} frames per minute, untiled): reference "
                  f"{60 / t_ref:.2f}, old {60 / t_old:.2f}, new {60 / t_new:.2f}")
            print(f"  conv2d throughput reached by sampling: {frac:.0%} "
                  f"({n['conv_flops'] / 1e9:.1f} GFLOP per sample; conv2d fwd "
                  f"{n['conv2d_gflops']:.0f} GFLOP/s); peak RSS reference {peak['reference']:.0f} "
                  f"MB, old {peak['old']:.0f} MB, new {peak['new']:.0f} MB")
            if a.direct:
                dr = {w: statistics.median(r["direct"] for r in v) for w, v in res.items()}
                print(f"  direct: reference 100 samples {dr['reference']:.1f} s, old predict 100 "
                      f"{dr['old']:.1f} s, new predict {a.n_eq} {dr['new']:.1f} s -> "
                      f"{dr['reference'] / dr['new']:.2f}x")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
