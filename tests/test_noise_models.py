"""GMM and histogram noise models: likelihood, gradients, sampling, moments, files, use in an HDN."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from _helpers import TINY

from napari_hdn.engine import HDNModel, ModelConfig, ModelFileError, Normalisation
from napari_hdn.engine.files.safeio import write_file
from napari_hdn.engine.noise import (
    GMMNoiseModel,
    HistogramNoiseModel,
    load_noise_model,
    noise_model_kinds,
)
from napari_hdn.engine.noise.base import gaussian_log_pdf


def _gmm(seed=0, k=3, d=1):
    g = torch.Generator().manual_seed(seed)
    theta = 0.5 * torch.randn(3, k, d + 1, generator=g)
    return GMMNoiseModel((100.0, 1100.0), k, d, min_variance=4.0, scale=20.0, theta=theta,
                         info={"source": "test", "notes": []})


def _gaussian_pairs(n=400_000, seed=0):
    """Pairs with known std sqrt(2 (s - 100) + 25) and a gap in the signal (400..500 empty)."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(100, 1100, n).astype(np.float32)
    s = s[(s < 400) | (s > 500)]
    x = (s + rng.normal(size=s.size) * np.sqrt(2 * (s - 100) + 25)).astype(np.float32)
    return s, x


@pytest.fixture(scope="module")
def hist():
    s, x = _gaussian_pairs()
    return HistogramNoiseModel.from_pairs(s, x, signal_bins=50)


def test_fitted_kinds_are_registered():
    assert {"gmm", "histogram", "gaussian", "poisson-gaussian"} <= set(noise_model_kinds())


def test_gmm_single_component_is_the_gaussian_of_its_variance():
    theta = torch.zeros(3, 1, 2)
    theta[2, 0] = torch.tensor([math.log(0.25), math.log(4.0)])  # var = 1 + 100*(0.25 (1-u) + 4 u)
    m = GMMNoiseModel((0.0, 10.0), 1, 1, min_variance=1.0, scale=10.0, theta=theta,
                      extrapolation="clamp")
    s = torch.tensor([0.0, 5.0, 10.0, 20.0, -3.0])
    x = s + torch.tensor([1.0, -7.0, 30.0, 2.0, 0.5])
    u = (s / 10).clamp(0, 1)
    var = 1 + 100 * (0.25 * (1 - u) + 4 * u)
    torch.testing.assert_close(m.log_likelihood(x, s), gaussian_log_pdf(x, s, var))
    torch.testing.assert_close(m.moments(s)[1], var.sqrt())
    # the default continues the variance along its (here exact) line 26 + 37.5 s, floored at
    # max(1% of the smallest variance inside, min_variance) = 1
    lin = GMMNoiseModel((0.0, 10.0), 1, 1, min_variance=1.0, scale=10.0, theta=theta)
    var_lin = torch.tensor([26.0, 213.5, 401.0, 776.0, 1.0])
    torch.testing.assert_close(lin.log_likelihood(x, s), gaussian_log_pdf(x, s, var_lin))
    torch.testing.assert_close(lin.moments(s)[1], var_lin.sqrt())


def test_gmm_mixture_mean_is_the_signal_and_samples_match_moments():
    m = _gmm(1)
    s = torch.tensor([100.0, 400.0, 1100.0])
    mean, std = m.moments(s)
    torch.testing.assert_close(mean, s)
    _, delta, _ = m.components(s)
    assert delta.abs().max() > 1.0  # components really are off-centre
    gen = torch.Generator().manual_seed(0)
    draws = m.sample(s.repeat(200_000, 1), generator=gen)
    torch.testing.assert_close(draws.mean(0), s, atol=0.3, rtol=0)
    torch.testing.assert_close(draws.std(0), std, rtol=0.01, atol=0)


def test_gmm_density_integrates_to_one():
    m = _gmm(2)
    for s in (100.0, 600.0, 1100.0):
        xs = torch.linspace(s - 400, s + 400, 40_001, dtype=torch.float64)
        p = m.log_likelihood(xs, torch.full_like(xs, s)).exp()
        assert abs(float(torch.trapezoid(p, xs)) - 1.0) < 1e-4


def test_gmm_float32_is_stable_and_matches_float64():
    m = _gmm(3)
    s = torch.tensor([100.0, 650.0, 1100.0, 65535.0, -1e4, 500.0], dtype=torch.float32)
    x = torch.tensor([101.0, 600.0, 1300.0, 65000.0, 1e6, -1e7], dtype=torch.float32)
    ll32 = m.log_likelihood(x, s.requires_grad_(True))
    assert torch.isfinite(ll32).all()
    (g,) = torch.autograd.grad(ll32.sum(), s)
    assert torch.isfinite(g).all()
    ll64 = m.double().log_likelihood(x.double(), s.detach().double())
    torch.testing.assert_close(ll32.double()[:3], ll64[:3], rtol=1e-5, atol=1e-4)
    assert ll32[4] < -1e5 and ll32[5] < -1e5  # far outliers: very unlikely, but finite


def test_gmm_gradient_in_signal_matches_finite_differences():
    m = _gmm(4).double()
    s = torch.tensor([150.0, 420.0, 900.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([160.0, 400.0, 930.0], dtype=torch.float64)
    (g,) = torch.autograd.grad(m.log_likelihood(x, s).sum(), s)
    h = 1e-4
    fd = (m.log_likelihood(x, s.detach() + h) - m.log_likelihood(x, s.detach() - h)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-8)


def test_gmm_broadcasts_over_image_batches():
    m = _gmm(5)
    s = torch.rand(4, 1, 16, 16) * 1000 + 100
    assert m.log_likelihood(s + 3, s).shape == (4, 1, 16, 16)
    assert m.log_likelihood(torch.tensor(500.0), s).shape == (4, 1, 16, 16)


def test_histogram_rows_are_normalised_and_std_is_right(hist):
    dr = hist.offset_bin_width
    torch.testing.assert_close(hist.density.sum(1) * dr, torch.ones(hist.n_signal_bins), rtol=1e-5,
                               atol=0)
    s = torch.tensor([150.0, 300.0, 600.0, 1000.0])
    mean, std = hist.moments(s)
    truth = torch.sqrt(2 * (s - 100) + 25)
    assert ((std / truth - 1).abs() < 0.03).all(), (std, truth)
    assert ((mean - s).abs() < 0.05 * truth).all()


def test_histogram_fills_empty_rows_and_handles_outside_values(hist):
    assert hist.info["histogram"]["filled_rows"] >= 3  # the 400..500 gap
    # a signal in the gap gets a sensible (interpolated) noise level
    std_gap = float(hist.moments(torch.tensor([450.0]))[1])
    assert abs(std_gap / math.sqrt(2 * 350 + 25) - 1) < 0.05
    s = torch.tensor([450.0, 600.0, 600.0, 50.0, 5000.0], requires_grad=True)
    x = torch.tensor([450.0, 600.0 + 1e5, 600.0 - 1e5, 55.0, 4990.0])
    ll = hist.log_likelihood(x, s)
    assert torch.isfinite(ll).all()
    assert ll[1] < ll[0] - 100 and ll[2] < ll[0] - 100  # far outside: tail, still finite
    (g,) = torch.autograd.grad(ll.sum(), s)
    assert torch.isfinite(g).all()


def test_histogram_is_differentiable_in_signal(hist):
    # piecewise linear: autograd equals a small central difference (away from kinks)
    s = torch.tensor([300.3, 700.7, 1000.1], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([331.1, 650.2, 1010.9], dtype=torch.float64)
    h64 = copy.deepcopy(hist).double()
    (g,) = torch.autograd.grad(h64.log_likelihood(x, s).sum(), s)
    e = 1e-4
    with torch.no_grad():
        fd = (h64.log_likelihood(x, s + e) - h64.log_likelihood(x, s - e)) / (2 * e)
    torch.testing.assert_close(g, fd, rtol=1e-3, atol=1e-6)
    # on average, observations above the signal pull it up and those below pull it down
    s = torch.full((400,), 600.0, requires_grad=True)
    off = torch.linspace(10.0, 40.0, 200)
    x = torch.cat([600.0 + off, 600.0 - off])
    (g,) = torch.autograd.grad(hist.log_likelihood(x, s).sum(), s)
    assert g[:200].mean() > 0.01 and g[200:].mean() < -0.01


def test_histogram_samples_match_moments(hist):
    s = torch.full((200_000,), 700.0)
    draws = hist.sample(s, generator=torch.Generator().manual_seed(0))
    mean, std = hist.moments(s[:1])
    assert abs(float(draws.mean() - mean)) < 0.3
    assert abs(float(draws.std() / std) - 1) < 0.01


@pytest.mark.parametrize("kind", ["gmm", "histogram"])
def test_save_load_round_trip_is_exact(tmp_path, hist, kind):
    m = _gmm(6) if kind == "gmm" else hist
    m.info = {**m.info, "verdict": "good", "reasons": [], "signal_range": [100.0, 1100.0]}
    path = tmp_path / f"{kind}.hdnoise"
    m.save(path)
    back = load_noise_model(path)
    assert type(back) is type(m)
    for a, b in zip(m.buffers(), back.buffers()):
        assert torch.equal(a, b)
    assert back.describe() == m.describe()
    json.dumps(back.describe())
    s = torch.rand(1000) * 1000 + 100
    x = s + torch.randn(1000) * 20
    assert torch.equal(m.log_likelihood(x, s), back.log_likelihood(x, s))
    assert torch.equal(m.moments(s)[1], back.moments(s)[1])


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.hdnoise"
    _gmm().save(good)
    cases = {}
    p = tmp_path / "random.hdnoise"
    p.write_bytes(np.random.default_rng(0).bytes(500))
    cases[p] = "not a readable"
    p = tmp_path / "truncated.hdnoise"
    p.write_bytes(good.read_bytes()[:-40])
    cases[p] = "not a readable"
    p = tmp_path / "foreign.safetensors"
    write_file(p, {"w": torch.zeros(3)}, {"something": "else"})
    cases[p] = "without napari-hdn metadata"
    p = tmp_path / "other-format.hdn"
    write_file(p, {"w": torch.zeros(3)}, {"format": "napari-hdn-model"})
    cases[p] = "not a napari-hdn noise model"
    p = tmp_path / "unknown-kind.hdnoise"
    write_file(p, {}, {"format": "napari-hdn-noise-model", "format_version": 1, "kind": "magic",
                       "params": {}})
    cases[p] = "unknown noise model kind"
    p = tmp_path / "bad-params.hdnoise"
    params, tensors = _gmm().get_state()
    write_file(p, {"theta": torch.zeros(2, 2)}, {"format": "napari-hdn-noise-model",
                                                 "format_version": 1, "kind": "gmm", "params": params})
    cases[p] = "invalid"
    cases[tmp_path / "missing.hdnoise"] = "not found"
    for path, words in cases.items():
        with pytest.raises(ModelFileError, match=words):
            load_noise_model(path)


def test_models_reject_invalid_parameters():
    with pytest.raises(ValueError, match="signal_range"):
        GMMNoiseModel((5.0, 5.0))
    with pytest.raises(ValueError, match="NaN"):
        GMMNoiseModel((0.0, 1.0), 1, 0, theta=torch.full((3, 1, 1), float("nan")))
    with pytest.raises(ValueError, match="positive"):
        HistogramNoiseModel((0, 1), (-1, 1), torch.zeros(2, 4), torch.ones(2))


@pytest.mark.parametrize("kind", ["gmm", "histogram"])
def test_fitted_noise_models_train_an_hdn(tmp_path, hist, kind):
    noise = _gmm(7) if kind == "gmm" else hist
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**TINY), noise, Normalisation(600.0, 250.0))
    x = torch.randn(2, 1, 32, 32)
    loss, recon, kl = model.loss(x)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.ladder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(not b.requires_grad for b in noise.buffers())  # the noise model stays fixed
    path = tmp_path / "m.hdn"
    model.save(path)
    from napari_hdn.engine import load_model

    back = load_model(path)
    assert back.noise_model.kind == kind
    s = torch.rand(100) * 800 + 200
    assert torch.equal(back.noise_model.log_likelihood(s + 5, s), noise.log_likelihood(s + 5, s))
