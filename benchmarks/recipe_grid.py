"""Recipe grid: MMSE PSNR against optimiser steps for many variants of the fast preset, at once.

The core benchmark's data (``fluo100`` and ``natural25``: 3 images of 256x256 each, the GMM fitted
from the calibration stack as the benchmark does) are trained on with variants of the fast preset
(noise model, dropout, learning rate, batch, EMA, architecture), each in its own process, all at
once: meant for a GPU, where step counts are what transfers (read them against the CPU seconds per
step of each variant, ``--cpu-cost``). At every mark the model the trainer would return is scored
(MMSE of ``--samples`` antithetic samples; at the last two marks also with test-time augmentation
at the same number of passes). Rows are printed and appended to ``--jsonl`` as they come, so a run
cut short keeps what it finished.

    python -m benchmarks.recipe_grid --device cuda --parallel 16 --jsonl grid.jsonl
    python -m benchmarks.recipe_grid --cpu-cost --variants fluo-base,fluo-blocks1   # s/step on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .time_to_quality import BASE_TRAINING

# name -> (dataset, noise model "gmm" | "true", architecture overrides, training overrides, marks)
MARKS = (325, 650, 1300, 2000)
LONG = (325, 650, 1300, 2000, 3000, 4000)
VARIANTS: dict[str, tuple[str, str, dict, dict, tuple]] = {
    "fluo-base": ("fluo100", "gmm", {}, {}, LONG),
    "fluo-true": ("fluo100", "true", {}, {}, MARKS),
    "fluo-drop0": ("fluo100", "gmm", {"dropout": 0.0}, {}, MARKS),
    "fluo-lr5e-3": ("fluo100", "gmm", {}, {"lr": 5e-3, "warmup_steps": 100}, MARKS),
    "fluo-b32": ("fluo100", "gmm", {}, {"batch_size": 32}, MARKS),
    "fluo-ema.998": ("fluo100", "gmm", {}, {"ema_decay": 0.998}, MARKS),
    "fluo-blocks1": ("fluo100", "gmm", {"blocks": 1}, {}, MARKS),
    "fluo-z32": ("fluo100", "gmm", {"z_dim": 32}, {}, MARKS),
    "fluo-L3": ("fluo100", "gmm", {"levels": 3}, {}, MARKS),
    "fluo-fb0.5": ("fluo100", "gmm", {"free_bits": 0.5}, {}, MARKS),
    "nat-base": ("natural25", "gmm", {}, {}, LONG),
    "nat-true": ("natural25", "true", {}, {}, MARKS),
    "nat-drop0": ("natural25", "gmm", {"dropout": 0.0}, {}, MARKS),
    "nat-lr5e-3": ("natural25", "gmm", {}, {"lr": 5e-3, "warmup_steps": 100}, MARKS),
    "nat-b32": ("natural25", "gmm", {}, {"batch_size": 32}, MARKS),
    "nat-blocks1": ("natural25", "gmm", {"blocks": 1}, {}, MARKS),
}
# second round: one residual block per level (the cheapest step of the first round, 0.66x the
# fast preset's CPU time, no worse per step) combined with what else looked good
_B1, _LR5 = {"blocks": 1}, {"lr": 5e-3, "warmup_steps": 100}
for _ds, _short in (("fluo100", "fluo"), ("natural25", "nat")):
    VARIANTS.update({
        f"{_short}-b1-lr5": (_ds, "gmm", _B1, _LR5, MARKS),
        f"{_short}-b1-z32": (_ds, "gmm", {**_B1, "z_dim": 32}, {}, MARKS),
        f"{_short}-b1-L3": (_ds, "gmm", {**_B1, "levels": 3}, {}, MARKS),
        f"{_short}-b1-lr5-z32": (_ds, "gmm", {**_B1, "z_dim": 32}, _LR5, MARKS),
    })


def _data(name: str):
    from .datasets import Dataset, make_datasets

    saved = os.environ.get("HDN_GRID_DATA")  # a folder of <name>.npz written by --save-data
    if saved and (Path(saved) / f"{name}.npz").exists():
        z = np.load(Path(saved) / f"{name}.npz")
        return Dataset(name, list(z["noisy"]), list(z["clean"]), z["calibration"],
                       json.loads(str(z["noise"])), "")
    for ds in make_datasets(256, 3, 0):
        if ds.name == name:
            return ds
    raise KeyError(name)


def _noise_model(ds, kind: str, cache: Path):
    from napari_hdn.engine import GaussianNoiseModel, PoissonGaussianNoiseModel
    from napari_hdn.engine.noise.channels import load_noise_model

    if kind == "true":
        n = ds.noise
        if n["kind"] == "gaussian":
            return GaussianNoiseModel(n["sigma"])
        return PoissonGaussianNoiseModel(n["gain"], n["read_noise"], n["offset"])
    return load_noise_model(cache / f"{ds.name}.hdnn")


def _settings(variant: str) -> tuple[dict, dict]:
    from napari_hdn.engine.training.presets import get_preset

    _, _, arch, training, _ = VARIANTS[variant]
    preset = get_preset("fast CPU")
    return {**preset.model, **arch}, {**preset.training, "val_fraction": 0.0, **training}


def run_variant(variant: str, device: str, samples: int, cache: str, jsonl: str | None,
                scale: float = 1.0) -> list:
    import torch

    from napari_hdn.engine import ModelConfig, Trainer, TrainingConfig
    from napari_hdn.engine.metrics import psnr, ssim

    torch.set_num_threads(1)
    dsname, nm_kind, _, _, marks = VARIANTS[variant]
    marks = tuple(max(2, int(m * scale)) for m in marks)
    ds = _data(dsname)
    nm = _noise_model(ds, nm_kind, Path(cache))
    arch, training = _settings(variant)
    tcfg = TrainingConfig(**{**BASE_TRAINING, **training, "device": device, "seed": 0,
                             "max_steps": marks[-1]})
    tr = Trainer(list(ds.noisy), nm, model_config=ModelConfig(**arch), training_config=tcfg)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def score(model, step: int) -> None:
        row = {"variant": variant, "steps": step, "train_seconds": tr.train_seconds,
               "wall_s": time.perf_counter() - t0}
        preds = [model.predict(x, n_samples=samples, seed=0).mmse for x in ds.noisy]
        row["psnr"] = float(np.mean([psnr(p, c) for p, c in zip(preds, ds.clean)]))
        row["ssim"] = float(np.mean([ssim(p, c) for p, c in zip(preds, ds.clean)]))
        if step >= marks[-2]:  # the same number of passes spread over the 8 orientations
            per = max(1, round(samples / 8))
            tta = [model.predict(x, n_samples=per, seed=0, tta=True).mmse for x in ds.noisy]
            row["psnr_tta"] = float(np.mean([psnr(p, c) for p, c in zip(tta, ds.clean)]))
            row["tta_samples"] = per * 8
        rows.append(row)
        print(json.dumps(row), flush=True)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_step(ev):
        if ev.kind == "step" and ev.step in marks[:-1]:
            score(tr.snapshot(), ev.step)

    tr.report.callbacks.append(on_step)
    model = tr.run()
    score(model, tr.step)
    return rows


def cpu_cost(variants: list[str], steps: int) -> None:
    """Seconds per step on this machine's CPU (median after a warm-up), one variant after another
    in fresh processes."""
    from .time_to_quality import in_fresh_process

    for v in variants:
        print(f"{v:16s} {in_fresh_process(_cpu_cost_one, v, steps):.3f} s/step", flush=True)


def _cpu_cost_one(variant: str, steps: int) -> float:
    from napari_hdn.engine import GaussianNoiseModel, ModelConfig, Trainer, TrainingConfig

    ds = _data(VARIANTS[variant][0])
    arch, training = _settings(variant)
    times: list[float] = []
    tcfg = TrainingConfig(**{**BASE_TRAINING, **training, "device": "cpu", "seed": 0,
                             "max_steps": steps})
    # the noise model's cost is a few elementwise operations: a Gaussian stands in for every one
    tr = Trainer(list(ds.noisy), GaussianNoiseModel(10.0), model_config=ModelConfig(**arch),
                 training_config=tcfg)
    last = [time.perf_counter()]

    def on_step(ev):
        if ev.kind == "step":
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    tr.report.callbacks.append(on_step)
    tr.run()
    return float(np.median(times[5:]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parallel", type=int, default=len(VARIANTS))
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--cpu-cost", action="store_true", help="only time CPU steps of each variant")
    ap.add_argument("--cost-steps", type=int, default=25)
    ap.add_argument("--save-data", default=None, help="write the data sets to this folder and stop")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every mark (smoke runs)")
    a = ap.parse_args(argv)
    names = a.variants.split(",")
    if a.save_data:  # for a machine whose scikit-image lacks the bundled images
        Path(a.save_data).mkdir(parents=True, exist_ok=True)
        for dsname in sorted({VARIANTS[n][0] for n in names}):
            ds = _data(dsname)
            np.savez_compressed(Path(a.save_data) / f"{dsname}.npz", noisy=np.stack(ds.noisy),
                                clean=np.stack(ds.clean), calibration=ds.calibration,
                                noise=json.dumps(ds.noise))
        return
    if a.cpu_cost:
        cpu_cost(names, a.cost_steps)
        return
    from napari_hdn.engine.noise.fitting import fit_from_calibration

    cache = Path(tempfile.mkdtemp(prefix="hdn-grid-"))
    for dsname in sorted({VARIANTS[n][0] for n in names}):
        ds = _data(dsname)
        t = time.perf_counter()
        fit_from_calibration(ds.calibration, kind="gmm", device="cpu", seed=0).save(
            cache / f"{dsname}.hdnn")
        print(f"{dsname}: GMM fitted in {time.perf_counter() - t:.1f} s", flush=True)
    import multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.get_context("spawn").Pool(min(a.parallel, len(names))) as pool:
        pool.starmap(run_variant, [(n, a.device, a.samples, str(cache), a.jsonl, a.scale) for n in names])


if __name__ == "__main__":
    main()
