"""Smoke test of the benchmark suite: every dataset, method, metric and the report, in seconds."""

import json

import numpy as np

from benchmarks import metrics
from benchmarks.datasets import make_datasets
from benchmarks.run import run


def test_metrics_by_hand():
    gt = np.array([[0.0, 10.0], [10.0, 0.0]])
    assert metrics.psnr(gt + 1.0, gt) == 20.0  # range 10, mse 1
    samples = np.stack([gt + d for d in np.linspace(-1, 1, 41)])
    cal = metrics.calibration(samples, samples.mean(0), gt)
    assert cal["coverage95"] == 1.0


def test_datasets_are_reproducible_and_noisy_as_stated():
    a = make_datasets(64, 1, seed=3)
    b = make_datasets(64, 1, seed=3)
    assert [d.name for d in a] == ["fluo20", "fluo100", "natural25", "stripes"]
    for da, db in zip(a, b):
        np.testing.assert_array_equal(da.noisy[0], db.noisy[0])
    nat = a[2]
    assert abs(float(np.std(nat.noisy[0] - nat.clean[0])) - 25.0) < 1.5


def test_smoke_profile_writes_results_and_report(tmp_path):
    res = run("smoke", out_dir=tmp_path, docs_dir=tmp_path / "docs", log=lambda *a: None)
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert set(saved["datasets"]) == {"fluo20", "fluo100", "natural25", "stripes"}
    fluo = saved["datasets"]["fluo20"]["methods"]
    for m in ("noisy input", "NL-means", "TV", "Noise2Void (built-in)",
              "HDN MMSE, calibration noise model", "HDN MMSE, bootstrapped noise model"):
        assert np.isfinite(fluo[m]["psnr_mean"]) and 0 < fluo[m]["ssim_mean"] <= 1
    hdn = fluo["HDN MMSE, calibration noise model"]
    assert -1 <= hdn["std_error_corr"] <= 1 and 0 <= hdn["coverage95"] <= 1
    assert stripes_off_corr_is_undefined(saved)
    stripes = saved["datasets"]["stripes"]["methods"]
    assert stripes["HDN MMSE, calibration noise model, levels 1-2 zero"]["levels"][:2] == ["zero", "zero"]
    # classical baselines beat the noisy input even here
    assert fluo["NL-means"]["psnr_mean"] > fluo["noisy input"]["psnr_mean"] + 3
    report = (tmp_path / "docs" / "benchmarks-smoke.md").read_text()
    assert "## stripes" in report and "PSNR" in report
    assert (tmp_path / "docs" / "benchmarks-crops-smoke.png").stat().st_size > 10_000
    assert res["duration_s"] > 0


def stripes_off_corr_is_undefined(saved):
    """With every level of the 2-level smoke model off, samples do not vary: no correlation."""
    m = saved["datasets"]["stripes"]["methods"]["HDN MMSE, calibration noise model, levels 1-2 zero"]
    return m["std_error_corr"] is None
