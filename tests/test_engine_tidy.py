"""The engine's front-end facing API: stop exception, train() keywords, samplers that leave the
caller's model alone, and prediction in rounds that keeps what a stop leaves."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from _helpers import TINY, smooth_image

from napari_hdn.engine import (
    GaussianNoiseModel,
    ModelConfig,
    StopFlag,
    StopRequested,
    TrainingConfig,
    predict,
    predict_in_rounds,
    train,
)


def _noisy(shape=(40, 52), seed=0):
    rng = np.random.default_rng(seed)
    return smooth_image(shape, seed) + rng.normal(0, 10, shape).astype(np.float32)


def test_stop_flag_raises_the_neutral_exception():
    flag = StopFlag()
    flag.check()  # not set: nothing happens
    flag.set()
    with pytest.raises(StopRequested):
        flag.check()


def test_train_takes_the_trainer_keyword_names():
    img = _noisy((64, 64))
    kw = dict(max_steps=2, steps_per_epoch=2, seed=0, device="cpu", patch_size=32, batch_size=4)
    tcfg = TrainingConfig(**kw)
    a = train(img, GaussianNoiseModel(10.0), model_config=ModelConfig(**TINY), training_config=tcfg)
    assert a.config == ModelConfig(**TINY) and a.info["steps"] == 2
    with pytest.raises(TypeError, match="unknown training option 'config'"):
        train(img, GaussianNoiseModel(10.0), config=ModelConfig(**TINY))


def test_latent_mode_alias_is_gone():
    from napari_hdn.engine import config

    assert not hasattr(config, "LatentMode") and config.LATENT_MODES[0] == "posterior"


def test_sampler_and_predict_leave_the_callers_model_alone(tiny_model):
    tiny_model.ladder.train()  # e.g. a model still being trained
    formats_before = [p.is_contiguous() for p in tiny_model.ladder.parameters()]
    params_before = [p.detach().clone() for p in tiny_model.ladder.parameters()]
    s = tiny_model.sampler(_noisy(), device="cpu")
    s.sample(2)
    predict(tiny_model, _noisy(), n_samples=2, device="cpu")
    assert tiny_model.ladder.training  # not switched to eval mode
    assert [p.is_contiguous() for p in tiny_model.ladder.parameters()] == formats_before
    assert tiny_model.device.type == "cpu"
    for p, q in zip(tiny_model.ladder.parameters(), params_before):
        assert p.data_ptr() != 0 and torch.equal(p.detach(), q)
    # the sampler samples with an eval-mode, channels-last copy
    assert s.net is not tiny_model and not s.net.ladder.training
    conv = next(p for p in s.net.ladder.parameters() if p.dim() == 4 and min(p.shape[-2:]) > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_a_ready_model_is_not_copied(tiny_model):
    from napari_hdn.engine.prediction.sampling import inference_model

    ready = inference_model(tiny_model)
    assert ready is not tiny_model and ready.sampler(_noisy()).net is ready


def test_prediction_in_rounds_equals_one_call(tiny_model):
    img = np.stack([_noisy(seed=k) for k in range(2)])
    one = predict(tiny_model, img, n_samples=20, axes="TYX", seed=5, return_samples=True)
    events = []
    rounds = predict_in_rounds(tiny_model, img, n_samples=20, axes="TYX", seed=5,
                               return_samples=True, callbacks=events.append)
    assert rounds.n_samples == 20 and rounds.info["stopped"] is False
    np.testing.assert_allclose(rounds.samples, one.samples, atol=1e-5)
    np.testing.assert_allclose(rounds.mmse, one.mmse, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(rounds.variance, one.variance, rtol=1e-4, atol=1e-3)
    steps = [e.step for e in events if e.kind == "step"]
    assert steps == sorted(steps) and steps[-1] == 20 and events[-1].kind == "done"


def test_a_stop_keeps_the_finished_rounds(tiny_model):
    img = _noisy()
    flag = StopFlag()

    def stop_after_16(ev):
        if ev.kind == "step" and ev.step >= 16:
            flag.set()

    res = predict_in_rounds(tiny_model, img, n_samples=400, seed=1, return_samples=True,
                            stop_flag=flag, callbacks=stop_after_16)
    assert res.info["stopped"] is True and res.info["n_requested"] == 400
    assert 16 <= res.n_samples < 400 and res.samples.shape == (res.n_samples, *img.shape)
    np.testing.assert_allclose(res.mmse, res.samples.mean(0), rtol=1e-4, atol=1e-3)
    ref = predict(tiny_model, img, n_samples=res.n_samples, seed=1)
    np.testing.assert_allclose(res.mmse, ref.mmse, rtol=1e-5, atol=1e-4)
    # stopped before any round finished: nothing to keep
    flag.set()
    with pytest.raises(StopRequested):
        predict_in_rounds(tiny_model, img, n_samples=10, stop_flag=flag)


def test_stop_from_another_thread_during_rounds(tiny_model):
    flag, first_round = StopFlag(), threading.Event()
    out = {}

    def watch(ev):
        if ev.kind == "step" and ev.step >= 8:
            first_round.set()

    t = threading.Thread(target=lambda: out.setdefault("res", predict_in_rounds(
        tiny_model, _noisy((64, 64)), n_samples=100000, stop_flag=flag, callbacks=watch)))
    t.start()
    assert first_round.wait(30)
    flag.set()
    t.join(30)
    assert not t.is_alive() and 8 <= out["res"].n_samples < 100000


# -- one definition of each name and bound (issue 33) ---------------------------------------------


def test_event_names_are_str_enums_that_refuse_a_misspelling():
    import dataclasses
    import json

    from napari_hdn.engine import EventKind, EventTask, ProgressEvent

    ev = ProgressEvent("train", "step", step=3)
    assert ev.kind is EventKind.STEP and ev.task is EventTask.TRAIN
    assert ev.kind == "step" and f"{ev.task}/{ev.kind}" == "train/step"
    assert json.loads(json.dumps(dataclasses.asdict(ev)))["kind"] == "step"
    with pytest.raises(ValueError):
        ProgressEvent("train", "stpe")


def test_the_gmm_bounds_of_the_rules_are_what_the_model_and_the_fit_take():
    from napari_hdn.engine import InputError
    from napari_hdn.engine.noise import GMMNoiseModel, fit_noise_model
    from napari_hdn.engine.options import bounds

    (_, k_max), (d_min, d_max) = bounds("n_gaussians"), bounds("degree")
    GMMNoiseModel(n_gaussians=k_max, degree=d_max, signal_range=(0.0, 1.0))
    GMMNoiseModel(n_gaussians=1, degree=d_min, signal_range=(0.0, 1.0))
    with pytest.raises(ValueError, match=f"between 1 and {k_max}"):
        GMMNoiseModel(n_gaussians=k_max + 1, signal_range=(0.0, 1.0))
    s = np.linspace(0, 100, 2000, dtype=np.float32)
    with pytest.raises(InputError, match=f"degree {d_min}..{d_max}"):
        fit_noise_model(s, s, degree=d_max + 1)


def test_training_config_takes_its_bounds_from_the_rules():
    from pydantic import ValidationError

    from napari_hdn.engine.options import bounds

    for key in ("patch_size", "batch_size", "threads"):
        lo, hi = bounds(key)
        TrainingConfig(**{key: hi})
        with pytest.raises(ValidationError):
            TrainingConfig(**{key: hi + 1})
        with pytest.raises(ValidationError):
            TrainingConfig(**{key: lo - 1})
