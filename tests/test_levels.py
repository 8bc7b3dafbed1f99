"""Artefact removal by latent levels: the prior-sample mode, fine-tuning with levels withheld, and
the per-level description and suggestion (engine/levels.py)."""

import numpy as np
import pytest
import torch
from _helpers import TINY, smooth_image
from scipy import ndimage as ndi

import napari_hdn
from napari_hdn.engine import (
    GaussianNoiseModel,
    InputError,
    LadderVAE,
    ModelConfig,
    describe_levels,
    fine_tune,
    load_model,
)
from napari_hdn.engine.prediction.levels import structure_correlation

FAST = dict(TINY, patch_size=32, batch_size=8, bn_chunk=4, device="cpu", lr=3e-3)


def _striped(shape=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    clean = smooth_image(shape, seed)
    stripes = ndi.gaussian_filter1d(rng.normal(0, 1, shape), 5, axis=1)
    noisy = clean + rng.normal(0, 10, shape) + 8 * stripes / stripes.std()
    return clean, noisy.astype(np.float32)


def test_prior_sample_draws_around_the_prior_mean():
    """prior-sample is z = prior mean + prior std * eps: with eps = 0 it is prior-mean exactly, and
    the eps comes from the noise provider (position-keyed in prediction)."""
    torch.manual_seed(0)
    net = LadderVAE(ModelConfig(levels=2, z_dim=2, filters=8, blocks=1, dropout=0.0)).eval()
    bu = net.bottom_up(torch.randn(1, 1, 16, 16))
    asked = []

    def zeros(level, shape):
        asked.append(level)
        return torch.zeros(shape)

    with torch.no_grad():
        mean, _ = net.top_down(bu, ["prior-mean", "posterior"], zeros, compute_kl=False)
        s0, _ = net.top_down(bu, ["prior-sample", "posterior"], zeros, compute_kl=False)
        s1, kls = net.top_down(bu, ["prior-sample", "posterior"], lambda lv, sh: torch.ones(sh))
    assert torch.equal(mean, s0)
    assert not torch.equal(s0, s1)
    assert asked.count(1) == 1  # only the prior-sample pass asked for level-1 noise
    assert kls[0] is None and kls[1] is not None  # no KL for a level the image does not reach


def test_prior_sample_in_prediction_is_random_reproducible_and_tiles(tiny_model):
    _, img = _striped()
    a = tiny_model.predict(img, n_samples=6, seed=1, levels={1: "prior-sample"})
    b = tiny_model.predict(img, n_samples=6, seed=1, levels={1: "prior-sample"})
    c = tiny_model.predict(img, n_samples=6, seed=2, levels={1: "prior-sample"})
    mean = tiny_model.predict(img, n_samples=6, seed=1, levels={1: "prior-mean"})
    np.testing.assert_array_equal(a.mmse, b.mmse)
    assert not np.array_equal(a.mmse, c.mmse)
    assert a.levels == ["prior-sample", "posterior"]
    assert np.abs(a.mmse - mean.mmse).mean() > 1e-4
    tiled = tiny_model.predict(img, n_samples=6, seed=1, levels={1: "prior-sample"}, tile_size=48,
                               tile_overlap=32)
    assert tiled.info["tiles"] > 1
    np.testing.assert_allclose(tiled.mmse, a.mmse, rtol=1e-4, atol=1e-3)


def test_training_with_levels_withheld_samples_their_prior_and_old_files_keep_the_mean(tmp_path):
    _, noisy = _striped()
    model = napari_hdn.train(noisy, GaussianNoiseModel(10.0), **FAST, max_steps=2,
                             deactivated_levels=[1])
    assert model.default_modes() == ["prior-sample", "posterior"]
    assert model.config.withheld_mode == "prior-sample"
    # a file written before withheld_mode existed was trained with the prior mean: it keeps it
    from napari_hdn.engine.files.safeio import read_file, write_file

    path = model.save(tmp_path / "m.hdn")
    meta, tensors = read_file(path, "napari-hdn-model", "model")
    del meta["config"]["withheld_mode"]
    write_file(tmp_path / "old.hdn", tensors, meta)
    old = load_model(tmp_path / "old.hdn")
    assert old.default_modes() == ["prior-mean", "posterior"]


def test_fine_tune_withholds_levels_and_leaves_the_model_alone():
    _, noisy = _striped()
    model = napari_hdn.train(noisy, GaussianNoiseModel(10.0), **FAST, max_steps=3)
    before = {k: v.clone() for k, v in model.ladder.state_dict().items()}
    events = []
    tuned = fine_tune(model, noisy, [1], steps=3, batch_size=4, callbacks=events.append)
    assert tuned.config.deactivated_levels == [1]
    assert model.config.deactivated_levels == []
    assert tuned.default_modes() == ["prior-sample", "posterior"]
    assert tuned.info["fine_tuned"] == {"levels": [1], "steps": 3, "from_steps": 3}
    assert tuned.info["training_config"]["lr"] == pytest.approx(1e-3)
    for k, v in model.ladder.state_dict().items():
        assert torch.equal(v, before[k]), k  # the given model is untouched
    changed = [k for k, v in tuned.ladder.state_dict().items() if not torch.equal(v, before[k])]
    assert any("levels.1" in k for k in changed)  # the upper level trained on
    assert tuned.normalisation.mean == model.normalisation.mean
    assert [e.kind for e in events].count("step") == 3
    r = tuned.predict(noisy, n_samples=2)
    assert r.levels == ["prior-sample", "posterior"] and np.isfinite(r.mmse).all()
    with pytest.raises(InputError, match="at least one level must stay active"):
        fine_tune(model, noisy, [1, 2], steps=1)
    with pytest.raises(InputError, match="level numbers"):
        fine_tune(model, noisy, ["a"], steps=1)
    with pytest.raises(InputError, match="no levels to withhold"):
        fine_tune(model, noisy, [], steps=1)


def test_structure_correlation_tells_artefacts_from_lost_detail():
    rng = np.random.default_rng(0)
    img = smooth_image((128, 128), 3) + 40 * (ndi.gaussian_filter(rng.random((128, 128)), 1.5) > 0.56)
    stripes = ndi.gaussian_filter1d(rng.normal(0, 1, img.shape), 5, axis=1)
    blurred = ndi.gaussian_filter(img, 1.0)
    assert abs(structure_correlation(stripes, img)) < 0.15  # independent of the image
    assert structure_correlation(img - blurred, blurred) > 0.4  # detail of the image itself


def test_structure_is_scored_at_the_level_scale():
    """A coarse level removes the image's layout (a band of it, several pixels wide), not its
    finest detail: at pixel scale that scores like an artefact, at the level's scale like signal."""
    rng = np.random.default_rng(1)
    img = smooth_image((256, 256), 3) + 40 * (ndi.gaussian_filter(rng.random((256, 256)), 1.5) > 0.56)
    layout = ndi.gaussian_filter(img, 3.0) - ndi.gaussian_filter(img, 8.0)
    stripes = ndi.gaussian_filter1d(rng.normal(0, 1, img.shape), 5, axis=1)
    assert structure_correlation(layout, img - layout, scale=1.0) < 0.25
    assert structure_correlation(layout, img - layout, scale=4.0) > 0.5
    for scale in (2.0, 4.0):
        assert abs(structure_correlation(stripes, img, scale=scale)) < 0.15


def test_a_level_that_removes_far_more_than_the_one_below_reads_as_signal():
    from napari_hdn.engine.prediction.levels import MAX_GROWTH, level_verdict

    assert level_verdict(0.01, 0.0) == "nothing"
    assert level_verdict(0.5, 0.30) == "signal"  # where it removes follows the image
    assert level_verdict(0.5, 0.10) == "artefact"
    assert level_verdict(0.5, 0.10, below=0.8) == "artefact"  # stripes: less than level 1
    assert level_verdict(0.5, 0.10, below=0.45 / MAX_GROWTH) == "signal"  # scan lines' level 2
    assert level_verdict(0.05, 0.10, below=0.0) == "artefact"  # nothing below: no growth to read


def test_the_suggestion_keeps_the_upper_half_of_the_levels_on(monkeypatch):
    from napari_hdn.engine import HDNModel, Normalisation
    from napari_hdn.engine.prediction import levels

    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**{**TINY, "levels": 4}), GaussianNoiseModel(10.0),
                     Normalisation(50.0, 30.0))
    model.ladder.eval()
    # every level's removal reads as an artefact: the suggestion still stops at level 2 of 4
    monkeypatch.setattr(levels, "structure_correlation", lambda removed, estimate, scale: 0.0)
    monkeypatch.setattr(levels, "MIN_ENERGY", -1.0)
    monkeypatch.setattr(levels, "MAX_GROWTH", float("inf"))
    _, img = _striped()
    rep = describe_levels(model, img, n_samples=2, crop=64)
    assert [s.verdict for s in rep.steps] == ["artefact"] * 3
    assert rep.levels_off == [1, 2] and levels.max_suggested_level(4) == 2
    assert any("level 3" in n and "not suggested" in n for n in rep.notes)
    assert levels.max_suggested_level(2) == 1 and levels.max_suggested_level(6) == 3


def test_describe_levels_reports_each_level_and_suggests_bottom_levels(tiny_model):
    _, img = _striped()
    rep = describe_levels(tiny_model, np.stack([img, img]), n_samples=3, crop=48)
    assert [s.level for s in rep.steps] == [1]  # the top level always stays
    assert rep.crop == (8, 8, 48, 48)  # centred, origin on the 2**L grid
    s = rep.steps[0]
    assert s.energy >= 0 and -1 <= s.structure <= 1 and np.isfinite(s.dll)
    assert s.verdict in ("artefact", "signal", "nothing")
    assert len(rep.suggested) == 2 and rep.suggested[1] == "posterior"
    assert rep.suggested[0] == ("prior-mean" if s.verdict == "artefact" else "posterior")
    assert rep.to_dict()["levels_off"] == rep.levels_off
    assert rep.lines()[-1].startswith("suggested:") or rep.notes
    again = describe_levels(tiny_model, img, n_samples=3, crop=48)
    assert again.steps == rep.steps  # seeded: the same numbers
    with pytest.raises(InputError, match="mode must be one of"):
        describe_levels(tiny_model, img, mode="posterior")
    with pytest.raises(InputError, match="frame 5 does not exist"):
        describe_levels(tiny_model, np.stack([img, img]), frame=5)
