"""Calibration of HDN's uncertainty against the ground truth (PSNR and SSIM are
:mod:`napari_hdn.engine.metrics`, the one definition the product, the demo and the benchmarks
share)."""

from __future__ import annotations

import numpy as np


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
