"""Adapters from the benchmark to the engine's learned parts: Noise2Void and noise-model fitting."""

from __future__ import annotations

import time

import numpy as np


def train_n2v(noisy: list[np.ndarray], budget_s: float, seed: int, patch: int):
    """The built-in Noise2Void network, trained for ``budget_s`` seconds of wall clock."""
    from napari_hdn.engine.noise.n2v import train_n2v as _train

    den = _train(list(noisy), device="cpu", seed=seed, time_budget_s=budget_s, max_steps=10**7,
                 patch_size=patch)
    return den, int(den.info.get("steps", 0))


def predict_n2v(den, image: np.ndarray) -> np.ndarray:
    return np.asarray(den.predict(image, device="cpu"), np.float32)


def calibration_noise_model(stack: np.ndarray, seed: int):
    """GMM fitted on a calibration stack (signal = mean over frames)."""
    from napari_hdn.engine.noise.fitting import fit_from_calibration

    return fit_from_calibration(stack, kind="gmm", device="cpu", seed=seed)


def bootstrap_noise_model(noisy: list[np.ndarray], pseudo: list[np.ndarray], seed: int):
    """GMM fitted on (noisy, Noise2Void prediction) pairs, signal clipped to 0.5/99.5 percentiles."""
    from napari_hdn.engine.noise.fitting import fit_bootstrap

    return fit_bootstrap(list(noisy), list(pseudo), kind="gmm", device="cpu", seed=seed)


def describe(nm) -> dict:
    d = nm.describe()
    out = {k: v for k, v in d.items() if isinstance(v, (int, float, str, list, bool)) or v is None}
    return out


def gmm_fit_speed(n_pairs: int, seed: int = 0) -> dict:
    """Time a GMM fit on ``n_pairs`` synthetic Poisson-Gaussian (signal, observation) pairs."""
    from napari_hdn.engine.noise.fitting import fit_noise_model

    rng = np.random.default_rng(seed)
    s = rng.uniform(100, 1100, n_pairs).astype(np.float32)
    x = (rng.poisson(s - 100) + 100 + rng.normal(0, 3, n_pairs)).astype(np.float32)
    t = time.perf_counter()
    fit_noise_model(s, x, kind="gmm", device="cpu", seed=seed)
    return {"pairs": n_pairs, "seconds": time.perf_counter() - t}
