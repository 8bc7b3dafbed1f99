import math

import pytest
import torch
from _helpers import TINY

from napari_hdn.engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation
from napari_hdn.engine.network.blocks import GatedResBlock, GhostBatchNorm2d
from napari_hdn.engine.network.ladder import LadderVAE, free_bits_kl, gaussian_kl, pad_to_multiple


@pytest.mark.parametrize("shape", [(37, 45), (8, 8), (33, 64), (5, 70)])
def test_output_shape_odd_sizes(shape):
    net = LadderVAE(ModelConfig(**{**TINY, "levels": 3}))
    s, kls = net(torch.randn(2, 1, *shape))
    assert s.shape == (2, 1, *shape)
    assert len(kls) == 3 and all(k.shape == (2,) for k in kls)


def test_pad_to_multiple_pads_bottom_right_and_crops_back():
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    xp, (h, w) = pad_to_multiple(x, 4)
    assert xp.shape == (1, 1, 8, 8) and (h, w) == (5, 7)
    assert torch.equal(xp[..., :5, :7], x)  # original kept at the origin
    assert torch.equal(xp[..., 5, :7], x[..., 3, :])  # reflection
    tiny = torch.ones(1, 1, 2, 2)
    assert pad_to_multiple(tiny, 8)[0].shape == (1, 1, 8, 8)  # replicate when too small


def test_parameter_count_of_paper_configuration():
    n = sum(p.numel() for p in LadderVAE(ModelConfig()).parameters())
    assert 7.0e6 < n < 7.6e6  # the paper reports ~7.3 M


def test_gaussian_kl_matches_hand_computation():
    mu_q, lv_q = torch.tensor(0.5), torch.tensor(math.log(0.25))
    mu_p, lv_p = torch.tensor(-0.5), torch.tensor(math.log(4.0))
    # KL = log(sp/sq) + (sq^2 + (mq-mp)^2) / (2 sp^2) - 1/2 = log(2/0.5) + (0.25+1)/8 - 0.5
    expected = math.log(4.0) + 1.25 / 8 - 0.5
    assert float(gaussian_kl(mu_q, lv_q, mu_p, lv_p)) == pytest.approx(expected, rel=1e-6)
    assert float(gaussian_kl(mu_p, lv_p, mu_p, lv_p)) == pytest.approx(0.0, abs=1e-7)


def test_free_bits_clamps_each_level_and_sample():
    kl = torch.tensor([[0.2, 3.0], [5.0, 0.9]])  # (levels, batch)
    assert free_bits_kl(kl, 1.0).tolist() == pytest.approx([1.0 + 5.0, 3.0 + 1.0])
    assert free_bits_kl(kl, 0.0).tolist() == pytest.approx([5.2, 3.9])


def test_loss_uses_free_bits_per_pixel():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "free_bits": 1000.0})  # every level below the free bits
    model = HDNModel(cfg, GaussianNoiseModel(1.0), Normalisation(0.0, 1.0))
    x = torch.randn(4, 1, 16, 16)
    loss, recon, kl = model.loss(x)
    # KL term = levels * free_bits / pixels exactly
    assert float((loss - recon).detach()) == pytest.approx(2 * 1000.0 / 256, rel=1e-5)
    assert kl.shape == (2,)


def test_ghost_batchnorm_equals_sequential_chunks():
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, chunk=4)
    ref = torch.nn.BatchNorm2d(3)
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    out = bn(x)
    # chunk j holds samples j, j+n, ... with n = 16 / 4 chunks
    n = 4
    for j in range(n):
        idx = torch.arange(j, 16, n)
        assert torch.allclose(out[idx], ref(x[idx]), atol=1e-5)
    # running stats: average of per-chunk updates
    ref2 = torch.nn.BatchNorm2d(3)
    means = []
    for j in range(n):
        r = torch.nn.BatchNorm2d(3)
        r(x[torch.arange(j, 16, n)])
        means.append(r.running_mean)
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-6)
    del ref2


def test_ablations_build_and_run():
    for flag in ("batchnorm", "gated", "generative_skip", "learned_top_prior"):
        net = LadderVAE(ModelConfig(**{**TINY, flag: False}))
        s, _ = net(torch.randn(2, 1, 16, 16))
        assert s.shape == (2, 1, 16, 16)
    net = LadderVAE(ModelConfig(**{**TINY, "batchnorm": False}))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    net = LadderVAE(ModelConfig(**{**TINY, "learned_top_prior": False}))
    assert "levels.1.top_prior" not in dict(net.named_parameters())


def test_dropout_is_channel_wise_as_in_the_reference():
    """Whole feature maps are dropped (nn.Dropout2d), not single pixels."""
    torch.manual_seed(0)
    block = GatedResBlock(8, dropout=0.5, batchnorm=False, gated=False)
    drops = [m for m in block.modules() if isinstance(m, torch.nn.Dropout2d)]
    assert len(drops) == 2
    y = drops[0](torch.ones(64, 8, 5, 5))
    per_map = y.flatten(2)
    # each (sample, channel) map is all zero or all 2.0 (= 1 / (1 - p))
    assert torch.all((per_map == 0).all(-1) | (per_map == 2.0).all(-1))
    assert float((per_map[..., 0] > 0).float().mean()) == pytest.approx(0.5, abs=0.06)
