"""The built-in Noise2Void denoiser and the bootstrapped noise model."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_hdn.engine import InputError, ModelFileError, StopFlag
from napari_hdn.engine.noise import (
    fit_bootstrap,
    fit_from_calibration,
    heldout_nll,
)
from napari_hdn.engine.noise.fitting import n2v_notes
from napari_hdn.engine.noise.n2v import (
    BlindSpotUNet,
    N2VConfig,
    N2VDenoiser,
    _Plateau,
    blind_spot_mask,
    load_n2v,
    train_n2v,
)

GAIN, READ, OFFSET = 2.0, 5.0, 100.0


pytestmark = pytest.mark.usefixtures("one_thread")
TINY_N2V = dict(filters=8, batch_size=8, patch_size=32, eval_every=20)


def smooth(shape, seed, sigma=4.0):
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.normal(size=shape), sigma)
    return (img - img.min()) / (img.max() - img.min())


def camera(clean, rng, frames=None):
    shape = clean.shape if frames is None else (frames, *clean.shape)
    shot = rng.poisson((clean - OFFSET) / GAIN, shape) * GAIN
    return (shot + OFFSET + rng.normal(0, READ, shape)).astype(np.float32)


def psnr(x, gt):
    return 10 * np.log10((gt.max() - gt.min()) ** 2 / np.mean((x - gt) ** 2))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    clean = np.stack([OFFSET + GAIN * 400 * smooth((64, 64), k) for k in range(3)])
    return clean, camera(clean, rng)


@pytest.fixture(scope="module")
def trained(data):
    _, noisy = data
    events = []
    den = train_n2v(noisy, max_steps=150, seed=0, callbacks=events.append, **TINY_N2V)
    return den, events


def test_mask_replaces_pixels_by_other_pixels_of_their_neighbourhood():
    gen = torch.Generator().manual_seed(0)
    bi, y, x, ny, nx = blind_spot_mask((4, 1, 33, 40), 0.02, 5, gen)
    assert ((ny != y) | (nx != x)).all()  # never the pixel itself
    assert ((ny - y).abs() <= 2).all() and ((nx - x).abs() <= 2).all()
    assert (ny >= 0).all() and (ny < 33).all() and (nx >= 0).all() and (nx < 40).all()
    per_patch = torch.bincount(bi, minlength=4)
    assert per_patch.min() >= 0.015 * 33 * 40 and per_patch.max() <= 0.03 * 33 * 40


def test_n2v_denoises_and_reports_progress(data, trained):
    clean, noisy = data
    den, events = trained
    pred = den.predict(noisy)
    assert pred.shape == noisy.shape and pred.dtype == np.float32
    assert psnr(pred, clean) > psnr(noisy, clean) + 3.0, (psnr(pred, clean), psnr(noisy, clean))
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 150
    assert all(e.task == "n2v" for e in events)
    vals = [e.metrics["val_loss"] for e in events if "val_loss" in e.metrics]
    assert min(vals) < vals[0] * 0.5
    assert den.info["steps"] == 150 and not den.info["stopped"]
    assert den.info["best_val_loss"] == pytest.approx(min(vals), rel=1e-6)


def test_tiled_prediction_matches_untiled(data, trained):
    _, noisy = data
    den, _ = trained
    big = np.concatenate([noisy[0], noisy[1][:, :37]], axis=1)  # 64 x 101, odd width
    whole = den.predict(big, tile_size=1024)
    tiled = den.predict(big, tile_size=24)
    assert tiled.shape == big.shape
    assert np.abs(tiled - whole).max() < 1e-3 * (big.max() - big.min())


def test_input_structures_are_kept(data, trained):
    _, noisy = data
    den, _ = trained
    assert den.predict(noisy[0]).shape == (64, 64)
    out = den.predict([noisy[0], noisy[1][:40, :50]])
    assert isinstance(out, list) and [o.shape for o in out] == [(64, 64), (40, 50)]
    np.testing.assert_allclose(out[0], den.predict(noisy)[0], atol=1e-3)
    assert train_n2v([noisy[0], noisy[1][:40, :50]], max_steps=2, **TINY_N2V).info["steps"] == 2


def test_stop_returns_best_weights_so_far(data):
    _, noisy = data
    stop = StopFlag()
    events = []

    def cb(ev):
        events.append(ev)
        if ev.kind == "step" and ev.step == 4:
            stop.set()

    den = train_n2v(noisy, max_steps=500, stop_flag=stop, callbacks=cb, **TINY_N2V)
    assert den.info["stopped"] and den.info["steps"] == 4
    assert events[-1].kind == "stopped"
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3, 4]
    assert np.isfinite(den.predict(noisy[0])).all()


def test_time_budget_ends_training(data):
    _, noisy = data
    den = train_n2v(noisy, max_steps=10_000, time_budget_s=1.0, **TINY_N2V)
    assert 0 < den.info["steps"] < 10_000 and den.info["seconds"] < 5
    assert den.info["stop_reason"] == "time_budget" and not den.info["converged"]
    assert "time limit of 1 s" in n2v_notes(den.info)[0]


def test_training_ends_when_the_validation_loss_levels_off(data):
    """The rule counts evaluations, not seconds: the same steps on a quiet or a busy machine."""
    _, noisy = data
    events = []
    kw = {**TINY_N2V, "eval_every": 10, "patience": 2, "lr_drops": 1}
    den = train_n2v(noisy, callbacks=events.append, **kw)
    info = den.info
    assert info["converged"] and info["stop_reason"] == "converged" and info["lr_drops"] == 1
    assert 0 < info["steps"] < 4000 and info["steps"] % 10 == 0
    assert n2v_notes(info) == []
    rates = [e.metrics["lr"] for e in events if e.kind == "step"]
    assert rates[0] == kw.get("lr", 4e-3) and rates[-1] == rates[0] / 2  # halved once
    assert events[-1].metrics["stop_reason"] == "converged"
    again = train_n2v(noisy, **kw)  # seeded: the same run
    assert again.info["steps"] == info["steps"]


def test_plateau_rule():
    rule = _Plateau(N2VConfig(patience=2, lr_drops=1, min_improvement=0.01, lr=1.0))
    for v in (1.0, 0.9, 0.895, 0.894):  # two evaluations under 1 % better: the rate halves
        rule.update(v)
    assert rule.lr == 0.5 and rule.drops == 1 and not rule.done
    rule.update(0.8)  # a real improvement resets the count
    rule.update(0.81)
    assert not rule.done
    rule.update(0.805)
    assert rule.done and rule.lr == 0.5


def test_same_seed_same_network(data):
    _, noisy = data
    a = train_n2v(noisy, max_steps=5, seed=7, **TINY_N2V).predict(noisy[0])
    b = train_n2v(noisy, max_steps=5, seed=7, **TINY_N2V).predict(noisy[0])
    c = train_n2v(noisy, max_steps=5, seed=8, **TINY_N2V).predict(noisy[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_save_load(tmp_path, data, trained):
    _, noisy = data
    den, _ = trained
    den.save(tmp_path / "n2v.safetensors")
    back = load_n2v(tmp_path / "n2v.safetensors")
    assert isinstance(back, N2VDenoiser) and back.info == den.info
    np.testing.assert_array_equal(back.predict(noisy[0]), den.predict(noisy[0]))
    (tmp_path / "bad").write_bytes(b"nonsense")
    with pytest.raises(ModelFileError):
        load_n2v(tmp_path / "bad")


def test_bad_inputs_give_clear_errors():
    with pytest.raises(InputError, match="constant"):
        train_n2v(np.full((64, 64), 3.0), max_steps=2)
    with pytest.raises(InputError, match="too small"):
        train_n2v(np.random.rand(8, 8), max_steps=2)
    bad = np.random.rand(64, 64)
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        train_n2v(bad, max_steps=2)
    with pytest.raises(InputError, match="2D image"):
        train_n2v(np.random.rand(2, 2, 64, 64), max_steps=2)
    with pytest.raises(InputError, match="mask_fraction"):
        train_n2v(np.random.rand(64, 64), max_steps=2, mask_fraction=0.9)


def test_unet_output_shape_and_size():
    net = BlindSpotUNet(depth=2, filters=16)
    assert net(torch.zeros(1, 1, 48, 36)).shape == (1, 1, 48, 36)
    assert sum(p.numel() for p in net.parameters()) < 200_000  # small on purpose


def test_bootstrapped_gmm_is_close_to_the_calibration_fit():
    """GMM from (noisy, N2V prediction) pairs vs GMM from calibration frames, scored on the same
    independent frames of a static sample (paired with its true signal)."""
    rng = np.random.default_rng(1)
    peak = 400
    cal_clean = OFFSET + GAIN * peak * smooth((64, 64), 100, 6.0)
    cal = camera(cal_clean, rng, frames=40)
    test_frames = camera(cal_clean, rng, frames=10)
    ev_s = np.broadcast_to(cal_clean, test_frames.shape).ravel()
    ev_x = test_frames.ravel()
    clean = np.stack([OFFSET + GAIN * peak * smooth((96, 96), k) for k in range(3)])
    noisy = camera(clean, rng)

    m_cal = fit_from_calibration(cal, compare_histogram=False)
    # Noise2Void trains until its validation loss levels off (a quicker rule than the default's)
    m_boot = fit_bootstrap(noisy, n2v=dict(filters=8, batch_size=8, patch_size=48, eval_every=10,
                                           patience=3, lr_drops=1), compare_histogram=False)
    assert m_boot.info["source"] == "n2v"
    run = m_boot.info["pairs_record"]["n2v"]
    assert run["converged"] and run["stop_reason"] == "converged" and run["lr_drops"] == 1
    assert not any("cut short" in r for r in m_boot.info["reasons"])
    nll_cal = heldout_nll(m_cal, ev_s, ev_x)
    nll_boot = heldout_nll(m_boot, ev_s, ev_x)
    assert nll_boot < nll_cal + 0.05, (nll_boot, nll_cal)
    # and the bootstrapped noise level is in the right range where most pixels are
    s = torch.tensor([400.0, 500.0])
    truth = np.sqrt(GAIN * (s.numpy() - OFFSET) + READ**2)
    ratio = m_boot.moments(s)[1].numpy() / truth
    assert (ratio > 0.9).all() and (ratio < 1.3).all(), ratio
