"""The noise-model verdict weighs a std difference against the sampling error of its bin."""

from __future__ import annotations

import numpy as np

from napari_hdn.engine import PoissonGaussianNoiseModel
from napari_hdn.engine.noise.diagnostics import binned_statistics, fit_verdict, std_tolerance


def _binned(model, count_top: int, data_std_factor: float):
    """Binned statistics where the data's std equals the model's except in the top bin."""
    rng = np.random.default_rng(0)
    s = np.repeat(np.linspace(110, 600, 20), 5000).astype(np.float32)
    s = s[: -5000 + count_top] if count_top < 5000 else s
    _, sd = (v.numpy() for v in model.moments(__import__("torch").tensor(s)))
    z = rng.normal(0, 1, s.size)
    for level in np.unique(s):  # exactly unit std per signal level: no sampling luck involved
        sel = s == level
        z[sel] = (z[sel] - z[sel].mean()) / z[sel].std(ddof=1)
    top = s == s.max()
    z[top] *= data_std_factor
    x = s + z * sd
    return binned_statistics(model, s, x, signal_range=(float(s.min()), float(s.max()) + 1e-3)), s.size


def test_a_sparse_bin_does_not_make_a_correct_model_suspicious():
    model = PoissonGaussianNoiseModel(1.0, 2.0, 100.0)
    # the data's std in a 90-pair bin is off by 15 %: within what 90 pairs can tell (about 22 %)
    binned, n = _binned(model, 90, 1 / 1.15)
    v = fit_verdict(model, binned, 60_000)
    assert v["verdict"] == "good", v["reasons"]
    assert any("matches the data's" in c and "90 pairs allow" in c for c in v["checks"])
    assert abs(std_tolerance([90])[0] - 3 / np.sqrt(178)) < 1e-9


def test_a_well_measured_difference_is_flagged():
    model = PoissonGaussianNoiseModel(1.0, 2.0, 100.0)
    binned, n = _binned(model, 5000, 1 / 1.15)
    v = fit_verdict(model, binned, 100_000)
    assert v["verdict"] == "suspicious"
    assert any("differs from the data's by +" in r and "5,000 pairs" in r for r in v["reasons"])
    assert not any("matches the data's" in c for c in v["checks"])
