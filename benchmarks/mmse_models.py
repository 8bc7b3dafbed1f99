"""Train the small models the MMSE variance-reduction study uses (benchmarks/mmse_quality.py).

    python -m benchmarks.mmse_models --out /tmp/speed-models --seconds 150

Two kinds of data (benchmarks/datasets.py): ``fluo20`` (fluorescence-like, Poisson + read noise)
and ``natural25`` (natural images, Gaussian sigma 25); architecture ``small`` (L4 z32 F32 B3, the
issue's small CPU configuration) and optionally ``paper`` (L6 z32 F64 B5, few steps: a model whose
posterior is shaped by data, not a converged one). Training settings are the "fast CPU" preset's.
Each model is saved as ``<out>/<arch>-<data>.hdn`` with its first test image ``<...>.npz``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ARCH = {
    "small": dict(levels=4, z_dim=32, filters=32, blocks=3, dropout=0.1),
    "paper": dict(levels=6, z_dim=32, filters=64, blocks=5, dropout=0.2),
}


def dataset(name: str, size: int = 256, n: int = 4, seed: int = 0):
    from . import datasets

    if name == "fluo20":
        return datasets.fluo(20.0, size, n, seed)
    if name == "natural25":
        return datasets.natural25(size, n, seed + 2)
    raise SystemExit(f"unknown data {name!r}")


def noise_model(ds):
    from napari_hdn.engine import GaussianNoiseModel, PoissonGaussianNoiseModel

    p = ds.noise
    if p["kind"] == "gaussian":
        return GaussianNoiseModel(p["sigma"])
    return PoissonGaussianNoiseModel(p["gain"], p["read_noise"], p["offset"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/speed-models")
    ap.add_argument("--data", default="fluo20,natural25")
    ap.add_argument("--arch", default="small")
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--seconds", type=float, default=150, help="training time per model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from napari_hdn.engine import ModelConfig, TrainingConfig, train
    from napari_hdn.engine.training.presets import get_preset

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for arch in a.arch.split(","):
        for data in a.data.split(","):
            ds = dataset(data)
            tc = dict(get_preset("fast CPU").training)
            tc.update(max_steps=a.steps, batch_size=a.batch, threads=a.threads, seed=0,
                      time_budget_s=a.seconds)
            t = time.perf_counter()
            model = train(np.stack(ds.noisy[1:]), noise_model(ds), axes="SYX",
                          model_config=ModelConfig(**ARCH[arch]),
                          training_config=TrainingConfig(**tc))
            path = out / f"{arch}-{data}.hdn"
            model.save(path)
            np.savez(path.with_suffix(".npz"), noisy=ds.noisy[0], clean=ds.clean[0])
            steps = model.info.get("steps", model.info.get("step", "?"))
            print(f"{path}: {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
