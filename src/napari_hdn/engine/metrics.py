"""Image quality scores against a ground truth (demo, benchmarks, tests)."""

from __future__ import annotations

import numpy as np


def psnr(image: np.ndarray, truth: np.ndarray, data_range: float | None = None) -> float:
    """PSNR in dB; the data range defaults to max - min of the truth (the paper's convention)."""
    truth = np.asarray(truth, dtype=np.float64)
    rng = float(truth.max() - truth.min()) if data_range is None else float(data_range)
    mse = float(np.mean((np.asarray(image, dtype=np.float64) - truth) ** 2))
    return float(10 * np.log10(rng**2 / mse))


def ssim(image: np.ndarray, truth: np.ndarray) -> float:
    """Structural similarity with the truth's data range (scikit-image)."""
    from skimage.metrics import structural_similarity

    truth = np.asarray(truth, dtype=np.float64)
    return float(structural_similarity(np.asarray(image, dtype=np.float64), truth,
                                       data_range=float(truth.max() - truth.min())))
