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
    "lr5e-3": (FAST_ARCH, dict(lr=5e-3, warmup_steps=100)),
    "lr2e-3-ema.98": (FAST_ARCH, dict(lr=2e-3, warmup_steps=50, ema_decay=0.98)),
    "lr2e-3-b8": (FAST_ARCH, dict(lr=2e-3, warmup_steps=50, batch_size=8)),
    "small-lr2e-3": (SMALL_ARCH, dict(lr=2e-3, warmup_steps=50)),
    "lr1e-3-ema.995": (FAST_ARCH, dict(lr=1e-3, warmup_steps=50, ema_decay=0.995)),
    # cosine annealing to the end of the run (one run per budget)
    "cos1e-3": (FAST_ARCH, dict(lr=1e-3, warmup_steps=50, lr_schedule="cosine")),
    "cos2e-3": (FAST_ARCH, dict(lr=2e-3, warmup_steps=50, lr_schedule="cosine")),
    "cos3e-3": (FAST_ARCH, dict(lr=3e-3, warmup_steps=50, lr_schedule="cosine")),
    "cos5e-3": (FAST_ARCH, dict(lr=5e-3, warmup_steps=100, lr_schedule="cosine")),
    "cos2e-3-b8": (FAST_ARCH, dict(lr=2e-3, warmup_steps=50, lr_schedule="cosine", batch_size=8)),
    "cos3e-3-b8": (FAST_ARCH, dict(lr=3e-3, warmup_steps=50, lr_schedule="cosine", batch_size=8)),
    "small-lr3e-3": (SMALL_ARCH, dict(lr=3e-3, warmup_steps=50)),
    "small-cos2e-3": (SMALL_ARCH, dict(lr=2e-3, warmup_steps=50, lr_schedule="cosine")),
    "z32-cos2e-3": (dict(FAST_ARCH, z_dim=32), dict(lr=2e-3, warmup_steps=50, lr_schedule="cosine")),
}
BASE_TRAINING = dict(patch_size=64, batch_size=16, early_stopping_patience=None, max_steps=10**7,
                     val_fraction=0.0, device="cpu")


def train_with_snapshots(images, noise_model, arch: dict, training: dict, marks_min=None, seed: int = 0,
                         log=print, marks_steps=None, device: str = "cpu") -> list[dict]:
    """Train until the last mark; at each mark keep a snapshot of the model.

    Marks are minutes of training (``marks_min``) or optimiser steps (``marks_steps``). A recipe
    whose schedule depends on the run's length is trained as a run of that length per mark:
    ``lr_schedule="cosine"`` once per mark; ``"cooldown"`` (the rate held, then lowered over the
    run's last ``cooldown_fraction``) once to the last mark, each earlier mark's run branching off
    it where that run's cool-down begins (up to there the runs are the same run; see
    :func:`_cooldown_branches`). Returns ``[{"minutes", "steps", "seconds_per_step", "model"}, ...]``.
    """
    from napari_hdn.engine import ModelConfig, StopFlag, Trainer, TrainingConfig

    by_steps = marks_steps is not None
    marks = sorted(int(m) for m in marks_steps) if by_steps else sorted(float(m) * 60 for m in marks_min)
    if training.get("lr_schedule") == "cooldown" and len(marks) > 1:
        return _cooldown_branches(images, noise_model, arch, training, marks, by_steps, seed, log,
                                  device)
    if training.get("lr_schedule") == "cosine" and len(marks) > 1:
        out = []
        for m in marks:
            one = [m] if by_steps else None
            out += train_with_snapshots(images, noise_model, arch, training,
                                        None if by_steps else [m / 60], seed, log, one, device)
        return out
    stop = StopFlag()
    limit = {"max_steps": marks[-1]} if by_steps else {"time_budget_s": marks[-1]}
    tcfg = TrainingConfig(**{**BASE_TRAINING, "device": device, **training, "seed": seed, **limit})
    tr = Trainer(list(images), noise_model, model_config=ModelConfig(**arch), training_config=tcfg,
                 stop_flag=stop)
    snaps: list[dict] = []

    def row(step: int, t: float) -> dict:
        return {"minutes": t / 60, "steps": step, "seconds_per_step": t / max(step, 1)}

    def on_step(ev):
        if ev.kind != "step":
            return
        t = ev.metrics["train_seconds"]
        while len(snaps) < len(marks) - 1 and (ev.step if by_steps else t) >= marks[len(snaps)]:
            r = row(ev.step, t)
            if not by_steps:
                r["minutes"] = marks[len(snaps)] / 60
            snaps.append(r | {"model": tr.snapshot()})
            log(f"    {r['minutes']:.2f} min: {ev.step} steps ({r['seconds_per_step']:.3f} s/step)")

    tr.report.callbacks.append(on_step)
    model = tr.run()
    r = row(tr.step, tr.train_seconds)
    if not by_steps:
        r["minutes"] = marks[-1] / 60
    snaps.append(r | {"model": model})
    log(f"    {r['minutes']:.2f} min: {tr.step} steps ({r['seconds_per_step']:.3f} s/step)")
    return snaps


def _cooldown_branches(images, noise_model, arch, training, marks, by_steps, seed, log, device):
    """Runs of the "cooldown" schedule for every mark at the cost of one long run and the earlier
    marks' cool-downs: the run to the last mark saves a checkpoint (weights, optimiser, random
    state, step, training seconds) where each earlier mark's cool-down would begin; each is then
    resumed with its own length (time budget or max steps), so it cools down over its own last
    part. The held phase is the same for every length, so a branch is the run of that length
    (same seed), except that its steps' timings were those of the long run."""
    import tempfile

    from napari_hdn.engine import ModelConfig, Trainer, TrainingConfig

    f = float(training.get("cooldown_fraction", TrainingConfig().cooldown_fraction))
    key = "max_steps" if by_steps else "time_budget_s"
    base = {**BASE_TRAINING, "device": device, **training, "seed": seed}
    starts = [(1.0 - f) * m for m in marks[:-1]]
    with tempfile.TemporaryDirectory(prefix="hdn-cooldown-") as tmp:
        tr = Trainer(list(images), noise_model, model_config=ModelConfig(**arch),
                     training_config=TrainingConfig(**{**base, key: marks[-1]}))
        tr.checkpoint_dir = Path(tmp)
        saved: list[Path] = []

        def on_step(ev):
            if ev.kind != "step":
                return
            at = ev.step if by_steps else ev.metrics["train_seconds"]
            while len(saved) < len(starts) and at >= starts[len(saved)]:
                saved.append(tr._save_checkpoint(f"branch{len(saved)}"))

        tr.report.callbacks.append(on_step)
        last = tr.run()
        runs = []
        for m, path in zip(marks[:-1], saved):
            b = Trainer(list(images), None, training_config=TrainingConfig(**{**base, key: m}),
                        resume=path)
            runs.append((m, b.run(), b.step, b.train_seconds))
        runs.append((marks[-1], last, tr.step, tr.train_seconds))
    out = []
    for m, model, steps, secs in runs:
        r = {"minutes": secs / 60 if by_steps else m / 60, "steps": steps,
             "seconds_per_step": secs / max(steps, 1), "model": model}
        log(f"    {r['minutes']:.2f} min: {steps} steps ({r['seconds_per_step']:.3f} s/step, cool-down)")
        out.append(r)
    return out


def in_fresh_process(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` in a new Python process (spawned) and return its result.

    Every timed training runs in its own process: measured here, a second training in the same
    process ran 10-30% slower per step than the first (allocator and heap state left behind), which
    would favour whichever method runs first.
    """
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def _recipe_curve(name: str, minutes: list[str] | None, samples: int, k: int,
                  steps: list[str] | None = None, device: str = "cpu") -> dict:
    from napari_hdn.engine import PoissonGaussianNoiseModel

    noisy, clean, (gain, read, offset) = spec_data()
    arch, training = RECIPES[name]
    t0 = time.perf_counter()
    snaps = train_with_snapshots(noisy, PoissonGaussianNoiseModel(gain, read, offset), arch, training,
                                 minutes, log=lambda *a: None, marks_steps=steps, device=device)
    rows = []
    for s in snaps:
        p, _ = mmse_psnr(s["model"], noisy[:k], clean[:k], samples)
        rows.append({k2: v for k2, v in s.items() if k2 != "model"} | {"psnr": float(np.mean(p))})
        print(f"  [{name}] {rows[-1]['steps']} steps {rows[-1]['minutes']:.2f} min: "
              f"PSNR {rows[-1]['psnr']:.2f}", flush=True)
    return {"arch": arch, "training": training, "curve": rows, "wall_s": time.perf_counter() - t0}


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
    ap.add_argument("--minutes", default="2,5,10", help="marks in minutes of training")
    ap.add_argument("--steps", default=None, help="marks in optimiser steps instead of minutes "
                    "(comparable across devices; e.g. on a GPU, then read against CPU s/step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=1, help="recipes trained at once (only with "
                    "--steps: wall-clock marks need the machine to themselves)")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--score-frames", type=int, default=2, help="frames scored (all are trained on)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from napari_hdn.engine.metrics import psnr

    noisy, clean, _ = spec_data()
    k = a.score_frames
    print(f"noisy input PSNR: {np.mean([psnr(x, c) for x, c in zip(noisy[:k], clean[:k])]):.2f} dB")
    names = a.recipes.split(",")
    minutes = None if a.steps else a.minutes.split(",")
    steps = a.steps.split(",") if a.steps else None
    args = [(n, minutes, a.samples, k, steps, a.device) for n in names]
    if a.parallel > 1 and steps:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(a.parallel) as pool:
            results = pool.starmap(_recipe_curve, args)
    else:
        results = [in_fresh_process(_recipe_curve, *x) for x in args]
    out = {}
    for name, r in zip(names, results):
        out[name] = r
        print(f"recipe {name}: {RECIPES[name]}  ({r['wall_s']:.0f} s)", flush=True)
        for row in r["curve"]:
            print(f"  {name:18s} {row['minutes']:6.2f} min {row['steps']:5d} steps "
                  f"({row['seconds_per_step']:.3f} s/step)  MMSE({a.samples}) PSNR {row['psnr']:.2f}",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
