import numpy as np
import pytest
import torch
from _helpers import smooth_image

from napari_hdn.engine import InputError, LadderVAE, ModelConfig, Prediction
from napari_hdn.engine.prediction.sampling import LatentNoise


def _noisy(shape=(40, 52), seed=0):
    rng = np.random.default_rng(seed)
    return smooth_image(shape, seed) + rng.normal(0, 10, shape).astype(np.float32)


def test_predict_shapes_and_types(tiny_model):
    img = _noisy((37, 45))
    res = tiny_model.predict(img, n_samples=5, return_samples=True)
    assert isinstance(res, Prediction)
    assert res.mmse.shape == res.variance.shape == (37, 45)
    assert res.samples.shape == (5, 37, 45)
    assert res.mmse.dtype == np.float32
    np.testing.assert_allclose(res.mmse, res.samples.mean(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(res.variance, res.samples.var(0), rtol=1e-3, atol=1e-3)
    assert (res.variance > 0).all()


def test_stack_keeps_input_axes(tiny_model):
    stack = np.stack([_noisy(seed=k) for k in range(3)])
    res = tiny_model.predict(stack, n_samples=3, axes="TYX", return_samples=True)
    assert res.mmse.shape == (3, 40, 52)
    assert res.samples.shape == (3, 3, 40, 52)
    single = tiny_model.predict(stack[1], n_samples=3)
    np.testing.assert_allclose(res.mmse[1], single.mmse, atol=1e-5)


def test_same_seed_same_samples_and_batch_size_independent(tiny_model):
    img = _noisy()
    a = tiny_model.predict(img, n_samples=6, seed=3, return_samples=True, batch_size=6)
    b = tiny_model.predict(img, n_samples=6, seed=3, return_samples=True, batch_size=4)
    c = tiny_model.predict(img, n_samples=6, seed=4, return_samples=True)
    np.testing.assert_allclose(a.samples, b.samples, atol=1e-5)
    assert not np.allclose(a.samples, c.samples)
    # samples differ from each other (diversity)
    assert np.abs(a.samples[0] - a.samples[1]).mean() > 1e-3


def test_tiled_equals_untiled(tiny_model):
    img = _noisy((96, 88), seed=2)
    full = tiny_model.predict(img, n_samples=4, seed=1)
    tiled = tiny_model.predict(img, n_samples=4, seed=1, tile_size=48, tile_overlap=32)
    assert tiled.info["tiles"] > 1
    # the tiny model's receptive field is covered by the overlap: equal to float32 rounding
    # (convolutions of different sizes sum in different orders)
    np.testing.assert_allclose(tiled.mmse, full.mmse, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(tiled.variance, full.variance, rtol=1e-3, atol=1e-3)
    # a too-small overlap is visibly different: the test can fail
    rough = tiny_model.predict(img, n_samples=4, seed=1, tile_size=48, tile_overlap=4)
    assert np.abs(rough.mmse - full.mmse).max() > 1e-2


def test_latent_noise_is_keyed_by_position():
    noise = LatentNoise(seed=5, block=8)
    whole = noise.region(1, 0, (2, 3, 20, 24), (0, 0))
    part = noise.region(1, 1, (1, 3, 9, 10), (7, 11))
    assert torch.equal(part[0], whole[1, :, 7:16, 11:21])
    assert not torch.equal(noise.region(2, 0, (1, 3, 4, 4), (0, 0)), whole[:1, :, :4, :4])


def test_level_modes(tiny_model):
    img = _noisy()
    default = tiny_model.predict(img, n_samples=4, seed=0)
    explicit = tiny_model.predict(img, n_samples=4, seed=0, levels=["posterior", "posterior"])
    np.testing.assert_array_equal(default.mmse, explicit.mmse)
    off1 = tiny_model.predict(img, n_samples=4, seed=0, levels={1: "prior-mean"})
    assert off1.levels == ["prior-mean", "posterior"]
    assert np.abs(off1.mmse - default.mmse).mean() > 1e-4
    zero1 = tiny_model.predict(img, n_samples=4, seed=0, levels={1: "zero"})
    assert np.abs(zero1.mmse - off1.mmse).mean() > 1e-4
    # every level off: the input would no longer reach the decoder (the same image for any input,
    # variance 0), so prediction refuses it as training does
    with pytest.raises(InputError, match="every latent level is switched off"):
        tiny_model.predict(img, n_samples=2, levels=["prior-mean"] * 2)


def test_level_mode_acts_only_on_its_level():
    """Switching off level 1 leaves everything above level 1 untouched."""
    torch.manual_seed(0)
    net = LadderVAE(ModelConfig(levels=3, z_dim=2, filters=8, blocks=1, dropout=0.0)).eval()
    x = torch.randn(1, 1, 32, 32)
    seen = {}

    def hook(name):
        def f(module, inp, out):
            seen.setdefault(name, []).append(out[0].detach().clone())

        return f

    for i, level in enumerate(net.levels):
        level.register_forward_hook(hook(i + 1))
    g = torch.Generator().manual_seed(0)
    eps = {}

    def noise(level, shape):
        if level not in eps:
            eps[level] = torch.randn(shape, generator=g)
        return eps[level]

    with torch.no_grad():
        bu = net.bottom_up(x)
        net.top_down(bu, ["posterior"] * 3, noise, compute_kl=False)
        net.top_down(bu, ["zero", "posterior", "posterior"], noise, compute_kl=False)
    assert torch.equal(seen[3][0], seen[3][1]) and torch.equal(seen[2][0], seen[2][1])
    assert not torch.equal(seen[1][0], seen[1][1])


def test_bad_modes_and_inputs(tiny_model):
    img = _noisy()
    with pytest.raises(InputError, match="levels 1..2"):
        tiny_model.predict(img, n_samples=1, levels={3: "zero"})
    with pytest.raises(InputError, match="unknown latent mode"):
        tiny_model.predict(img, n_samples=1, levels={1: "off"})
    bad = img.copy()
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        tiny_model.predict(bad, n_samples=1)
    with pytest.raises(InputError, match="n_samples"):
        tiny_model.predict(img, n_samples=0)
    with pytest.raises(InputError, match="overlap"):
        tiny_model.predict(img, n_samples=1, tile_size=16, tile_overlap=16)


def test_fused_inference_network_gives_the_unfused_numbers(tiny_model):
    from napari_hdn.engine.network.fastpath import FusedGatedResBlock
    from napari_hdn.engine.prediction.sampling import inference_model

    net = inference_model(tiny_model)
    assert any(isinstance(m, FusedGatedResBlock) for m in net.ladder.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.ladder.modules())
    assert inference_model(net) is net  # no second copy
    x = torch.from_numpy(tiny_model.normalisation.forward(_noisy((32, 48))))[None, None]
    noise = LatentNoise(seed=2, scheme="independent")

    def eps(level, shape):
        return noise.region(level, 0, shape, (0, 0))

    with torch.no_grad():
        ref, _ = tiny_model.ladder.top_down(tiny_model.ladder.bottom_up(x.expand(3, -1, -1, -1)),
                                            None, eps, compute_kl=False)
        out, _ = net.ladder.top_down(net.ladder.bottom_up(x.expand(3, -1, -1, -1)), None, eps,
                                     compute_kl=False)
    assert ref.abs().mean() > 0.01
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scheme", ["independent", "antithetic", "stratified"])
def test_every_sampling_scheme_is_keyed_by_position_and_sample(scheme):
    noise = LatentNoise(seed=5, block=8, scheme=scheme)
    whole = noise.region(1, 0, (16, 3, 20, 24), (0, 0))
    for first, n in ((0, 16), (3, 6), (7, 1), (9, 5)):  # batches starting mid pair / mid group
        part = noise.region(1, first, (n, 3, 9, 10), (7, 11))
        assert torch.equal(part, whole[first:first + n, :, 7:16, 11:21])
    # each sample is standard normal
    big = LatentNoise(seed=1, scheme=scheme).region(1, 0, (8, 16, 64, 64), (0, 0))
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01
    assert abs(float(big[5].std()) - 1) < 0.02
    if scheme == "antithetic":
        assert torch.equal(whole[1], -whole[0]) and torch.equal(whole[5], -whole[4])
        assert torch.equal(whole[0], LatentNoise(5, 8).region(1, 0, (1, 3, 20, 24), (0, 0))[0])
    if scheme == "stratified":  # a group of 8 takes one draw from each eighth, mirrored
        assert float(whole[:8].sum(0).abs().max()) < 1e-4
        q = torch.special.ndtr(whole[:8])
        strata = (q * 8).floor().sort(0).values
        assert torch.equal(strata, torch.arange(8.0).view(8, 1, 1, 1).expand_as(strata))


def test_sampling_option(tiny_model):
    img = _noisy()
    a = tiny_model.predict(img, n_samples=4, seed=1, return_samples=True)
    assert a.info["sampling"] == "antithetic"
    b = tiny_model.predict(img, n_samples=4, seed=1, return_samples=True, sampling="independent")
    np.testing.assert_allclose(a.samples[0], b.samples[0], atol=1e-5)  # pair j starts as 2j
    assert not np.allclose(a.samples[1], b.samples[1])
    big = _noisy((96, 88), seed=2)
    st = tiny_model.predict(big, n_samples=8, seed=1, sampling="stratified", batch_size=3)
    st2 = tiny_model.predict(big, n_samples=8, seed=1, sampling="stratified", tile_size=48,
                             tile_overlap=32)
    np.testing.assert_allclose(st.mmse, st2.mmse, rtol=1e-4, atol=1e-3)
    with pytest.raises(InputError, match="sampling scheme"):
        tiny_model.predict(img, n_samples=2, sampling="sobol")


def test_test_time_augmentation(tiny_model):
    from napari_hdn.engine.prediction.run import _orientations

    img = _noisy((40, 56))
    res = tiny_model.predict(img, n_samples=4, seed=3, tta=True)
    assert res.mmse.shape == res.variance.shape == img.shape and res.info["tta"] == 8
    seeds = res.info["tta_seeds"]
    assert seeds[0] == 3 and len(set(seeds)) == 8
    mus, vs = [], []
    for (fwd, inv), s in zip(_orientations(), seeds):
        r = tiny_model.predict(fwd(img), n_samples=4, seed=s)
        assert r.mmse.shape == fwd(img).shape
        mus.append(inv(r.mmse))
        vs.append(inv(r.variance))
    mus, vs = np.array(mus, np.float64), np.array(vs, np.float64)
    np.testing.assert_allclose(res.mmse, mus.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res.variance, vs.mean(0) + mus.var(0), rtol=1e-4, atol=1e-3)
    # each orientation's inverse brings the image back
    for fwd, inv in _orientations():
        assert np.array_equal(inv(fwd(img)), img)
    with pytest.raises(InputError, match="keeps no samples"):
        tiny_model.predict(img, n_samples=2, tta=True, return_samples=True)


def test_fused_block_in_stripes_equals_whole():
    from napari_hdn.engine.network.blocks import GatedResBlock
    from napari_hdn.engine.network.fastpath import FusedGatedResBlock

    torch.manual_seed(0)
    block = GatedResBlock(4, 0.0, True, True).eval()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    fused = FusedGatedResBlock(block)
    x = torch.randn(2, 4, 37, 20)
    with torch.no_grad():
        ref = block(x)
        fused.stripe_bytes = None
        whole = fused(x)
        fused.stripe_bytes = 2 * 4 * 20 * 4 * 5  # stripes of 5 rows
        striped = fused(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(striped, ref, rtol=1e-5, atol=1e-5)


def test_sampler_reuses_the_levels_above_a_toggle():
    """A sampler that keeps top-down states recomputes only the levels below the highest one whose
    mode changed, and gives the numbers of a full pass; the memory budget bounds what it keeps."""
    from napari_hdn.engine import GaussianNoiseModel, HDNModel, Normalisation

    torch.manual_seed(0)
    model = HDNModel(ModelConfig(levels=3, z_dim=2, filters=8, blocks=1, dropout=0.0),
                     GaussianNoiseModel(10.0), Normalisation(50.0, 30.0))
    model.ladder.eval()
    img = _noisy()[:32, :32]
    fresh = model.sampler(img, reuse_mb=0)
    kept = model.sampler(img)  # model.sampler keeps states by default
    calls = []
    for i, level in enumerate(kept.net.ladder.levels):
        level.register_forward_hook(lambda m, a, out, lv=i + 1: calls.append(lv))
    settings = [["posterior"] * 3, ["prior-mean", "posterior", "posterior"],
                ["posterior"] * 3, ["prior-sample", "prior-mean", "posterior"],
                ["prior-mean", "prior-mean", "posterior"]]
    recomputed = []
    for modes in settings:
        calls.clear()
        a = kept.sample(6, modes, seed=3, batch_size=4)
        recomputed.append(sorted(set(calls)))
        b = fresh.sample(6, modes, seed=3, batch_size=4)
        for u, v in zip(a[:2], b[:2]):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)
    # all levels; level 1 only (2 and 3 kept); none (level 1's output for all-posterior is kept:
    # only the output head runs); levels 2 and 1; level 1 only
    assert recomputed == [[1, 2, 3], [1], [], [1, 2], [1]]
    # another seed or another sample range shares nothing
    calls.clear()
    kept.sample(6, settings[1], seed=4, batch_size=4)
    assert sorted(set(calls)) == [1, 2, 3]
    # a budget too small for any state keeps nothing and still gives the same numbers
    tight = model.sampler(img, reuse_mb=1e-6)
    tight.sample(2, settings[0], seed=3)
    assert not tight._states.items
    np.testing.assert_allclose(tight.sample(2, settings[1], seed=3)[0],
                               fresh.sample(2, settings[1], seed=3)[0], rtol=1e-6, atol=1e-6)
