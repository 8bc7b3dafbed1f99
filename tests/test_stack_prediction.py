"""Whole-stack prediction: the "auto" sampling rule, frames sampled together, progress with a time
estimate, and a stop that keeps the finished frames."""

import numpy as np
import pytest
import torch
from _helpers import TINY, smooth_image

from napari_hdn.engine import (
    GaussianNoiseModel,
    HDNModel,
    InputError,
    ModelConfig,
    Normalisation,
    StopFlag,
    StopRequested,
    predict,
    predict_in_rounds,
)
from napari_hdn.engine.prediction.sampling import AutoSamples, PosteriorSampler, resolve_samples

pytestmark = pytest.mark.usefixtures("one_thread")


def _stack(n=4, shape=(40, 52), seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([smooth_image(shape, seed + k) + rng.normal(0, 10, shape).astype(np.float32)
                     for k in range(n)])


class StopAfter(StopFlag):
    """A stop flag that turns itself on after ``n`` looks (a stop in mid-run, deterministic)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        if self.n < 0:
            self.set()
        return super().is_set()

    def check(self) -> None:
        if self.is_set():
            raise StopRequested("stopped on request")


def test_auto_is_the_default_and_reports_samples_per_frame(tiny_model):
    stack = _stack()
    res = predict(tiny_model, stack, axes="ZYX", return_samples=True)
    counts = res.info["samples_per_frame"]
    assert len(counts) == 4 and all(8 <= c <= 100 for c in counts)
    assert res.info["samples_rule"]["rule"] == "auto"
    assert res.n_samples == max(counts)
    assert res.samples.shape == (8, 4, 40, 52)  # the first 8 (the floor) of every frame
    assert res.mmse.shape == res.variance.shape == stack.shape
    assert np.isfinite(res.mmse).all() and (res.variance > 0).all()


def test_auto_frame_equals_the_frame_alone(tiny_model):
    """Frames of a stack draw what each draws alone: same counts, same MMSE."""
    stack = _stack(3)
    res = predict(tiny_model, stack, axes="ZYX", seed=5)
    for k in range(3):
        one = predict(tiny_model, stack[k], seed=5)
        assert one.info["samples_per_frame"] == [res.info["samples_per_frame"][k]]
        np.testing.assert_allclose(one.mmse, res.mmse[k], atol=1e-5)


def test_the_rule_follows_its_tolerance(tiny_model):
    stack = _stack(2)
    strict = predict(tiny_model, stack, AutoSamples(tolerance_db=1e-6, reference=10**9,
                                                    max_samples=20), axes="ZYX")
    assert strict.info["samples_per_frame"] == [20.0, 20.0]  # never good enough: the cap
    loose = predict(tiny_model, stack, AutoSamples(tolerance_db=20.0), axes="ZYX")
    assert loose.info["samples_per_frame"] == [8.0, 8.0]  # always good enough: the floor
    # an MMSE that stops at the cap is the MMSE of that many samples
    fixed = predict(tiny_model, stack, 20, axes="ZYX")
    np.testing.assert_allclose(strict.mmse, fixed.mmse, atol=1e-5)
    np.testing.assert_allclose(strict.variance, fixed.variance, rtol=1e-4, atol=1e-4)


def test_the_rule_matches_its_estimate_of_the_monte_carlo_error(tiny_model):
    """At the stop, the MC variance of the pair means is within the rule's budget."""
    img = _stack(1)[0]
    rule = AutoSamples(tolerance_db=0.05)
    s = PosteriorSampler(tiny_model, img)
    mu, var, kept = s.sample(rule, keep_samples=True)
    n = s.counts[0]
    _, _, allk = PosteriorSampler(tiny_model, img).sample(n, keep_samples=True)
    pairs = allk.reshape(n // 2, 2, *img.shape).mean(1)
    mc = pairs.var(0, ddof=1).mean() / (n // 2)
    assert mc <= var.mean() * rule.factor * 1.01
    np.testing.assert_allclose(mu, allk.mean(0), atol=1e-4)
    np.testing.assert_allclose(kept, allk[:8], atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, "many", 2.5])
def test_bad_sample_counts_are_refused(bad):
    with pytest.raises(InputError, match="n_samples|whole number"):
        resolve_samples(bad)


def test_bad_rules_are_refused():
    with pytest.raises(InputError, match="tolerance"):
        AutoSamples(tolerance_db=0)
    with pytest.raises(InputError, match="max_samples"):
        AutoSamples(min_samples=50, max_samples=10)


def test_frames_sampled_together_equal_frames_one_by_one(tiny_model):
    stack = _stack(5)
    together = predict(tiny_model, stack, 4, axes="ZYX", batch_size=16, return_samples=True)
    assert together.info["frames_per_pass"] == 4
    apart = predict(tiny_model, stack, 4, axes="ZYX", batch_size=4, return_samples=True)
    assert apart.info["frames_per_pass"] == 1
    np.testing.assert_allclose(together.samples, apart.samples, atol=1e-5)
    np.testing.assert_allclose(together.mmse, apart.mmse, atol=1e-5)
    auto = predict(tiny_model, stack, axes="ZYX", batch_size=32)
    assert auto.info["frames_per_pass"] == 4
    auto1 = predict(tiny_model, stack, axes="ZYX", batch_size=8)
    assert auto.info["samples_per_frame"] == auto1.info["samples_per_frame"]
    np.testing.assert_allclose(auto.mmse, auto1.mmse, atol=1e-5)


def test_progress_counts_frames_with_a_time_estimate(tiny_model):
    events = []
    predict(tiny_model, _stack(4), axes="ZYX", callbacks=events.append)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4] and all(e.total == 4 for e in steps)
    assert all(e.metrics["unit"] == "frame" for e in steps)
    assert all(e.metrics["eta_s"] >= 0 for e in steps)
    assert steps[-1].metrics["samples_per_frame"] >= 8
    assert events[-1].kind == "done"
    fixed = []
    predict(tiny_model, _stack(2), 6, axes="ZYX", callbacks=fixed.append)
    assert fixed[-1].step == fixed[-1].total == 12
    assert all(e.metrics["unit"] == "sample" for e in fixed if e.kind == "step")


def test_a_stop_keeps_the_finished_frames(tiny_model):
    stack = _stack(4)
    full = predict(tiny_model, stack, axes="ZYX", seed=2)
    seen = []
    stop = StopFlag()

    def after_two(first, end, mmse, var, counts, samples):
        seen.append((first, end))
        if end == 2:
            stop.set()

    res = predict_in_rounds(tiny_model, stack, axes="ZYX", seed=2, stop_flag=stop,
                            on_frames=after_two)
    assert res.info["stopped"] and res.info["frames_done"] == 2
    assert res.mmse.shape == (2, 40, 52) and res.variance.shape == (2, 40, 52)
    np.testing.assert_allclose(res.mmse, full.mmse[:2], atol=1e-5)
    assert seen == [(0, 1), (1, 2)]
    # without keep_finished a stop is an exception, as before
    stop.clear()
    with pytest.raises(StopRequested):
        predict(tiny_model, stack, axes="ZYX", stop_flag=StopAfter(3))


def test_a_stop_keeps_whole_slices_of_the_first_axis(tiny_model):
    tz = _stack(6).reshape(2, 3, 40, 52)
    res = predict(tiny_model, tz, axes="TZYX", stop_flag=StopAfter(40), keep_finished=True,
                  batch_size=2)
    done = res.info["frames_done"]
    assert done in (0, 3) or res.mmse.shape == (done // 3, 3, 40, 52)
    assert res.mmse.shape[1:] == (3, 40, 52) and res.mmse.shape[0] * 3 == done


def test_a_stop_before_any_frame_finished(tiny_model):
    stack = _stack(3)
    with pytest.raises(StopRequested):
        predict_in_rounds(tiny_model, stack, axes="ZYX", stop_flag=StopAfter(1), batch_size=2)
    # one untiled frame keeps the samples it drew
    res = predict_in_rounds(tiny_model, stack[0], stop_flag=StopAfter(3), batch_size=2,
                            return_samples=True)
    assert res.info["stopped"] and res.n_samples == 6 and res.samples.shape == (6, 40, 52)
    np.testing.assert_allclose(res.mmse, res.samples.mean(0), atol=1e-4)


def test_fixed_counts_keep_rounds(tiny_model):
    res = predict_in_rounds(tiny_model, _stack(2), 12, axes="ZYX")
    assert res.n_samples == 12 and res.info["n_requested"] == 12
    assert res.info["samples_per_frame"] == [12.0, 12.0]


def _two_channel_model():
    from napari_hdn.engine.network.multichannel import MultiChannelModel

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = HDNModel(ModelConfig(**TINY), GaussianNoiseModel(10.0), Normalisation(50.0, 30.0))
        m.ladder.eval()
        models.append(m)
    return MultiChannelModel(models)


def test_channels_stop_keeps_frames_finished_in_every_channel():
    model = _two_channel_model()
    czyx = np.stack([_stack(4), _stack(4, seed=7)])
    full = predict(model, czyx, axes="CZYX")
    assert full.mmse.shape == czyx.shape and len(full.info["samples_per_frame"]) == 4
    stop = StopFlag()

    def after_one(first, end, mmse, var, counts, samples):
        assert len(mmse) == 2  # one array per channel
        stop.set()

    res = predict(model, czyx, axes="CZYX", stop_flag=stop, keep_finished=True,
                  on_frames=after_one)
    assert res.info["stopped"]
    k = res.info["frames_done"]
    assert res.mmse.shape == (2, k, 40, 52)
    np.testing.assert_allclose(res.mmse, full.mmse[:, :k], atol=1e-5)


def test_chunked_prediction_takes_auto(tiny_model, tmp_path):
    pytest.importorskip("dask")
    pytest.importorskip("zarr")
    from napari_hdn.engine.prediction.chunked import predict_to_zarr

    stack = _stack(2, shape=(64, 64))
    res = predict_to_zarr(tiny_model, stack, tmp_path / "p.zarr", axes="ZYX", tile_size=32,
                          return_samples=True)
    assert res.n_samples == "auto"
    assert res.samples.shape == (8, 2, 64, 64)
    assert np.isfinite(np.asarray(res.mmse)).all()
