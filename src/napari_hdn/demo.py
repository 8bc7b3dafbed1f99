"""`napari-hdn demo`: the whole workflow on built-in data with known ground truth, offline."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .engine.files.safeio import atomic_write, write_tiff
from .engine.metrics import psnr
from .engine.training.presets import DEFAULT_PRESET, get_preset
from .synthetic import noisy_fluorescence

#: settings of this run on top of the preset's training settings: its time budget stops it
#: (max_steps only bounds it), frequent validations keep the best model close to the end of it
DEMO_RUN = dict(max_steps=1_000_000, steps_per_epoch=25, val_fraction=0.25,
                early_stopping_patience=None)


def run_demo(out_dir: Path, minutes: float = 3.0, seed: int = 0, device: str = "auto",
             quiet: bool = False, n_samples: int = 100, callbacks=None) -> dict:
    """Make data, set the noise model, train for ``minutes``, predict, report and write files.

    The model and its training settings are the default preset's (``engine/presets.py``).
    ``callbacks`` receive the training and prediction progress events (the command line draws its
    progress bars from them).
    """
    from .engine import PoissonGaussianNoiseModel, Trainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = [noisy_fluorescence((192, 192), seed=seed + 10 * k) for k in range(4)]
    noisy = np.stack([f.noisy for f in frames])
    clean = np.stack([f.clean for f in frames])
    s0 = frames[0]
    noise = PoissonGaussianNoiseModel(s0.gain, s0.read_noise, s0.offset)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    preset = get_preset(DEFAULT_PRESET)
    say(f"data: 4 noisy frames of 192x192 (Poisson-Gaussian, gain {s0.gain}, read noise "
        f"{s0.read_noise}, offset {s0.offset}); noise model: {noise!r}; model: the "
        f"'{preset.name}' preset, trained for {minutes:g} min")
    tcfg = preset.training_config(**DEMO_RUN, seed=seed, device=device, time_budget_s=minutes * 60)
    trainer = Trainer(noisy, noise, axes="SYX", model_config=preset.model_config(),
                      training_config=tcfg, checkpoint_dir=out_dir / "checkpoints",
                      callbacks=callbacks)
    t0 = time.perf_counter()
    model = trainer.run()
    train_s = time.perf_counter() - t0
    model.info["axes"] = "SYX"
    model.save(out_dir / "demo.hdn")
    t0 = time.perf_counter()
    res = model.predict(noisy[0], n_samples=n_samples, seed=seed, return_samples=True,
                        callbacks=callbacks)
    pred_s = time.perf_counter() - t0
    truth = clean[0]
    figures = {
        "psnr_noisy": psnr(noisy[0], truth),
        "psnr_mmse": psnr(res.mmse, truth),
        "psnr_single_sample": psnr(res.samples[0], truth),
        "train_steps": trainer.step,
        "train_seconds": train_s,
        "predict_seconds": pred_s,
        "n_samples": n_samples,
        "preset": preset.name,
    }
    write_tiff(out_dir / "noisy.tif", noisy[0])
    write_tiff(out_dir / "truth.tif", truth)
    write_tiff(out_dir / "mmse.tif", res.mmse)
    write_tiff(out_dir / "variance.tif", res.variance)
    write_tiff(out_dir / "samples.tif", res.samples[:8])
    save_figure(out_dir / "demo.png", noisy[0], res.samples[0], res.samples[1], res.variance,
                res.mmse, truth, figures)
    print(f"PSNR noisy input: {figures['psnr_noisy']:.2f} dB")
    print(f"PSNR one sample:  {figures['psnr_single_sample']:.2f} dB")
    print(f"PSNR MMSE ({n_samples} samples): {figures['psnr_mmse']:.2f} dB "
          f"(+{figures['psnr_mmse'] - figures['psnr_noisy']:.2f} dB)")
    print(f"trained {trainer.step} steps in {train_s:.0f} s; predicted in {pred_s:.1f} s")
    print(f"wrote demo.hdn, noisy/mmse/variance/samples/truth .tif and demo.png to {out_dir}")
    return figures


def save_figure(path, noisy, s1, s2, variance, mmse, truth, figures) -> None:
    """Noisy | two samples | variance | MMSE | truth, one row."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(truth, [0.5, 99.8])
    panels = [
        (noisy, f"noisy ({figures['psnr_noisy']:.1f} dB)", "gray", (lo, hi)),
        (s1, "sample 1", "gray", (lo, hi)),
        (s2, "sample 2", "gray", (lo, hi)),
        (variance, "variance", "magma", tuple(np.percentile(variance, [1, 99.5]))),
        (mmse, f"MMSE ({figures['psnr_mmse']:.1f} dB)", "gray", (lo, hi)),
        (truth, "ground truth", "gray", (lo, hi)),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for ax, (img, title, cmap, (vmin, vmax)) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=90), "figure")
    plt.close(fig)
