"""Scores: PSNR and SSIM against ground truth, and calibration of HDN's uncertainty."""

from __future__ import annotations

import numpy as np


def psnr(x: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB, data range = max - min of the ground truth (as in the paper)."""
    rng = float(gt.max() - gt.min())
    mse = float(np.mean((x.astype(np.float64) - gt) ** 2))
    return float(10 * np.log10(rng**2 / mse))


def ssim(x: np.ndarray, gt: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(x.astype(np.float64), gt.astype(np.float64),
                                       data_range=float(gt.max() - gt.min())))


def calibration(samples: np.ndarray, mmse: np.ndarray, gt: np.ndarray) -> dict:
    """How well HDN's spread predicts its error.

    - ``std_error_corr``: Pearson correlation between per-pixel posterior std and |MMSE - truth|.
    - ``coverage95``: fraction of ground-truth pixels inside the central 95% interval of the samples
      (0.95 for a perfectly calibrated posterior).
    """
    std = samples.std(0)
    err = np.abs(mmse - gt)
    # undefined (None) when the samples do not vary, e.g. with every latent level switched off
    corr = float(np.corrcoef(std.ravel(), err.ravel())[0, 1]) if std.std() > 0 else None
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    cover = float(np.mean((gt >= lo) & (gt <= hi)))
    return {"std_error_corr": corr, "coverage95": cover}
