"""Quality against training time: train once, keep the model at several wall-clock marks, score each.

Used by the benchmark (curves of PSNR against minutes) and to choose the training recipe:

    python -m benchmarks.time_to_quality --recipes old,default --minutes 2,5,10 --samples 30

trains every recipe on the same noisy frames (fluorescence-like, Poisson-Gaussian noise, the data
of the hdn-spec section 8 measurement) and prints the MMSE PSNR of each snapshot. Run it alone on
the machine: the marks are wall-clock minutes of training (validation and snapshots excluded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# Candidate recipes: model and training settings on top of TrainingConfig's defaults.
FAST_ARCH = dict(levels=4, z_dim=16, filters=32, blocks=2, dropout=0.1)
SMALL_ARCH = dict(levels=4, z_dim=32, filters=32, blocks=3, dropout=0.2)
RECIPES: dict[str, tuple[dict, dict]] = {
    # what the fast preset trained with at commit beaa56d (lr 1e-3 already; 25-step epochs)
    "old": (FAST_ARCH, dict(lr=1e-3, steps_per_epoch=25)),
    "paper-lr": (FAST_ARCH, dict(lr=3e-4)),
    "lr1e-3": (FAST_ARCH, dict(lr=1e-3)),
    "lr2e-3": (FAST_ARCH, dict(lr=2e-3, warmup_steps=50)),
    "lr3e-3": (FAST_ARCH, dict(lr=3e-3, warmup_steps=50)),
    "lr2e-3-ema.98": (FAST_ARCH, dict(lr=2e-3, warmup_steps=50, ema_decay=0.98)),
    "lr2e-3-b8": (FAST_ARCH, dict(lr=2e-3, warmup_steps=50, batch_size=8)),
    "small-lr2e-3": (SMALL_ARCH, dict(lr=2e-3, warmup_steps=50)),
    "lr1e-3-ema.995": (FAST_ARCH, dict(lr=1e-3, warmup_steps=50, ema_decay=0.995)),
}
BASE_TRAINING = dict(patch_size=64, batch_size=16, early_stopping_patience=None, max_steps=10**7,
                     val_fraction=0.0, device="cpu")


def train_with_snapshots(images, noise_model, arch: dict, training: dict, marks_min, seed: int = 0,
                         log=print) -> list[dict]:
    """Train until the last mark; at each mark (minutes of training) keep a snapshot.

    Returns ``[{"minutes", "steps", "seconds_per_step", "model"}, ...]``.
    """
    from napari_hdn.engine import ModelConfig, StopFlag, Trainer, TrainingConfig

    marks = sorted(float(m) * 60 for m in marks_min)
    stop = StopFlag()
    tcfg = TrainingConfig(**{**BASE_TRAINING, **training, "seed": seed,
                             "time_budget_s": marks[-1]})
    tr = Trainer(list(images), noise_model, model_config=ModelConfig(**arch), training_config=tcfg,
                 stop_flag=stop)
    snaps: list[dict] = []

    def on_step(ev):
        if ev.kind != "step":
            return
        t = ev.metrics["train_seconds"]
        while len(snaps) < len(marks) - 1 and t >= marks[len(snaps)]:
            snaps.append({"minutes": marks[len(snaps)] / 60, "steps": ev.step,
                          "seconds_per_step": t / ev.step, "model": tr.snapshot()})
            log(f"    {snaps[-1]['minutes']:g} min: {ev.step} steps ({t / ev.step:.2f} s/step)")

    tr.report.callbacks.append(on_step)
    model = tr.run()
    snaps.append({"minutes": marks[-1] / 60, "steps": tr.step,
                  "seconds_per_step": tr.train_seconds / max(tr.step, 1), "model": model})
    log(f"    {marks[-1] / 60:g} min: {tr.step} steps ({snaps[-1]['seconds_per_step']:.2f} s/step)")
    return snaps


def mmse_psnr(model, noisy, clean, n_samples: int, seed: int = 0) -> tuple[list[float], list]:
    from napari_hdn.engine.metrics import psnr

    preds = [model.predict(x, n_samples=n_samples, seed=seed).mmse for x in noisy]
    return [psnr(p, c) for p, c in zip(preds, clean)], preds


def spec_data(seed: int = 0, n: int = 4, size: int = 256):
    """Fluorescence-like frames with Poisson-Gaussian noise (gain 2, read noise 5, offset 100)."""
    from benchmarks.datasets import fluo_sources

    rng = np.random.default_rng(seed)
    gain, read, offset = 2.0, 5.0, 100.0
    clean = [offset + 4 + 300 * s for s in fluo_sources(size, n, seed)]
    noisy = [(offset + gain * rng.poisson((c - offset) / gain) + rng.normal(0, read, c.shape))
             .astype(np.float32) for c in clean]
    return noisy, [c.astype(np.float32) for c in clean], (gain, read, offset)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--minutes", default="2,5,10")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--score-frames", type=int, default=2, help="frames scored (all are trained on)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from napari_hdn.engine import PoissonGaussianNoiseModel
    from napari_hdn.engine.metrics import psnr

    noisy, clean, (gain, read, offset) = spec_data()
    k = a.score_frames
    print(f"noisy input PSNR: {np.mean([psnr(x, c) for x, c in zip(noisy[:k], clean[:k])]):.2f} dB")
    nm = PoissonGaussianNoiseModel(gain, read, offset)
    out = {}
    for name in a.recipes.split(","):
        arch, training = RECIPES[name]
        print(f"recipe {name}: {arch} {training}", flush=True)
        t0 = time.perf_counter()
        snaps = train_with_snapshots(noisy, nm, arch, training, a.minutes.split(","))
        rows = []
        for s in snaps:
            p, _ = mmse_psnr(s["model"], noisy[:k], clean[:k], a.samples)
            rows.append({k2: v for k2, v in s.items() if k2 != "model"} | {"psnr": float(np.mean(p))})
            print(f"  {name:18s} {s['minutes']:5.1f} min {s['steps']:5d} steps "
                  f"({s['seconds_per_step']:.2f} s/step)  MMSE({a.samples}) PSNR {rows[-1]['psnr']:.2f}",
                  flush=True)
        out[name] = {"arch": arch, "training": training, "curve": rows,
                     "wall_s": time.perf_counter() - t0}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
