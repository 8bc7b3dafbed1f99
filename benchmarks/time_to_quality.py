"""Quality against training time: train once, keep the model at several marks (wall-clock minutes
or steps) for the benchmark run's curves of PSNR against minutes (``benchmarks/run.py``)."""

from __future__ import annotations

#: what the benchmark's settings go on top of: train to the last mark, on every image, on the CPU
BASE_TRAINING = dict(patch_size=64, batch_size=16, early_stopping_patience=None, max_steps=10**7,
                     val_fraction=0.0, device="cpu")


def train_with_snapshots(images, noise_model, arch: dict, training: dict, marks_min=None, seed: int = 0,
                         log=print, marks_steps=None, device: str = "cpu") -> list[dict]:
    """Train until the last mark; at each mark keep a snapshot of the model.

    Marks are minutes of training (``marks_min``) or optimiser steps (``marks_steps``). Returns
    ``[{"minutes", "steps", "seconds_per_step", "model"}, ...]``.
    """
    from napari_hdn.engine import ModelConfig, StopFlag, Trainer, TrainingConfig

    by_steps = marks_steps is not None
    marks = sorted(int(m) for m in marks_steps) if by_steps else sorted(float(m) * 60 for m in marks_min)
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


def in_fresh_process(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` in a new Python process (spawned) and return its result.

    Every timed training runs in its own process: measured here, a second training in the same
    process ran 10-30% slower per step than the first (allocator and heap state left behind), which
    would favour whichever method runs first.
    """
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)
