"""Smoke test of the benchmark suite: every dataset, method, metric and the report, in seconds."""

import json

import numpy as np
import pytest

from benchmarks.calibration import calibration
from benchmarks.datasets import make_datasets
from benchmarks.run import rewrite_report, run


def test_scores_by_hand():
    from napari_hdn.engine.metrics import psnr

    gt = np.array([[0.0, 10.0], [10.0, 0.0]])
    assert psnr(gt + 1.0, gt) == 20.0  # range 10, mse 1
    samples = np.stack([gt + d for d in np.linspace(-1, 1, 41)])
    cal = calibration(samples, samples.mean(0), gt)
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
    budgets = saved["settings"]["budgets_min"]
    names = ["noisy input", "NL-means", "TV"]
    for b in budgets:  # a point of each learned method's curve at every budget
        names += [f"Noise2Void (built-in), {b:g} min", f"HDN MMSE, calibration noise model, {b:g} min"]
    names.append(f"HDN MMSE, bootstrapped noise model, {saved['settings']['bootstrap_min']:g} min")
    for m in names:
        assert np.isfinite(fluo[m]["psnr_mean"]) and 0 < fluo[m]["ssim_mean"] <= 1, m
    hdn = [fluo[f"HDN MMSE, calibration noise model, {b:g} min"] for b in budgets]
    assert [h["budget_min"] for h in hdn] == budgets
    assert hdn[0]["train_steps"] <= hdn[-1]["train_steps"] and hdn[-1]["seconds_per_step"] > 0
    last = hdn[-1]
    assert -1 <= last["std_error_corr"] <= 1 and 0 <= last["coverage95"] <= 1
    oriented = fluo[f"HDN MMSE, calibration noise model, {budgets[-1]:g} min, 8 orientations"]
    assert oriented["orientations"] == 8 and oriented["train_steps"] == last["train_steps"]
    assert oriented["n_samples"] == 8 * -(-last["n_samples"] // 8)  # the same top-down passes, rounded up
    assert oriented["method"] == "HDN MMSE, calibration noise model, 8 orientations"
    stripes = saved["datasets"]["stripes"]["methods"]
    off = stripes[f"HDN MMSE, calibration noise model, {budgets[-1]:g} min, levels 1-2 zero"]
    assert off["levels"] == ["zero", "zero", "posterior"]  # the smoke model has 3 levels
    # classical baselines beat the noisy input even here
    assert fluo["NL-means"]["psnr_mean"] > fluo["noisy input"]["psnr_mean"] + 3
    report = (tmp_path / "docs" / "benchmarks-smoke.md").read_text()
    assert "## stripes" in report and "PSNR" in report and "HDN minus" in report
    assert "; 8 orientations " in report  # its figure beside each budget's verdict
    assert (tmp_path / "docs" / "benchmarks-crops-smoke.png").stat().st_size > 10_000
    assert (tmp_path / "docs" / "benchmarks-curves-smoke.png").stat().st_size > 10_000
    assert res["duration_s"] > 0
    assert saved["datasets"]["fluo20"]["measured"]["date"] == saved["date"]

    # measure one dataset again and carry the others over from this run
    again = run("smoke", out_dir=tmp_path / "again", docs_dir=tmp_path / "again", log=lambda *a: None,
                datasets=["natural25"], keep=str(tmp_path / "smoke.json"))
    assert list(again["datasets"]) == ["fluo20", "fluo100", "natural25", "stripes"]  # the usual order
    assert "kept_from" not in again["datasets"]["natural25"]
    for name in ("fluo20", "fluo100", "stripes"):
        assert again["datasets"][name]["kept_from"]["file"] == "smoke.json"
        assert again["datasets"][name]["methods"] == saved["datasets"][name]["methods"]
    with np.load(tmp_path / "again" / "smoke-crops.npz") as z:  # the kept datasets' crops too
        assert {k.split("|")[0] for k in z.files} == set(again["datasets"])
        assert z["fluo20|truth"].shape == (64, 64)  # the smoke images are smaller than the crop
    report = (tmp_path / "again" / "benchmarks-smoke.md").read_text()
    assert "this run measured natural25; fluo20, fluo100, stripes carried over" in report
    assert report.count("Measured in an earlier run") == 3
    # the report written again from the saved results and crops is the same report
    written = (tmp_path / "again" / "benchmarks-smoke.md").read_text()
    (tmp_path / "again" / "benchmarks-smoke.md").unlink()
    rewrite_report(str(tmp_path / "again" / "smoke.json"), tmp_path / "again")
    assert (tmp_path / "again" / "benchmarks-smoke.md").read_text() == written
    other = json.loads((tmp_path / "smoke.json").read_text())
    other["settings"]["hdn_training"]["lr"] = 1e-4
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"other settings \(hdn_training\)"):
        run("smoke", out_dir=tmp_path, docs=False, log=lambda *a: None, datasets=["fluo20"],
            keep=str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="unknown dataset"):
        run("smoke", out_dir=tmp_path, docs=False, log=lambda *a: None, datasets=["fluo50"])


def test_reusing_noise2void_needs_a_run_of_the_same_profile_and_seed(tmp_path):
    earlier = tmp_path / "quick.json"
    earlier.write_text(json.dumps({"profile": "quick", "settings": {"seed": 0}, "datasets": {}}))
    with pytest.raises(ValueError, match="profile 'quick', seed 0: give one of 'smoke', seed 0"):
        run("smoke", out_dir=tmp_path, docs=False, log=lambda *a: None, reuse_n2v=str(earlier))


def test_snapshots_at_step_marks_come_from_one_run():
    from benchmarks.time_to_quality import train_with_snapshots
    from napari_hdn.engine import GaussianNoiseModel

    rng = np.random.default_rng(0)
    images = [rng.normal(100.0, 10.0, (64, 64)).astype(np.float32) for _ in range(2)]
    arch = dict(levels=2, z_dim=2, filters=8, blocks=1, dropout=0.0)
    training = dict(lr=1e-3, warmup_steps=2, patch_size=32, batch_size=4)
    snaps = train_with_snapshots(images, GaussianNoiseModel(10.0), arch, training,
                                 marks_steps=[8, 12], log=lambda *a: None)
    assert [s["steps"] for s in snaps] == [8, 12]
    first, last = (s["model"].ladder.state_dict() for s in snaps)
    assert any(not np.array_equal(first[k].numpy(), last[k].numpy()) for k in first)  # a snapshot
    assert all(s["seconds_per_step"] > 0 for s in snaps)


def test_speed_tasks_of_the_benchmark_run_report_figures():
    from _helpers import TINY

    from benchmarks import speed

    arch = dict(TINY)
    q = speed.task_reference_predict("cpu", arch, 32, 2)
    assert q["seconds"] > 0 and q["peak_memory_mb"] > 0
    lat = speed.task_toggle_latency("cpu", arch, 32, 2, 2)
    assert lat["median_seconds"] > 0
    tm = speed.task_tiled_memory("cpu", arch, 64, 32, 1)
    assert tm["tiles"] > 1
