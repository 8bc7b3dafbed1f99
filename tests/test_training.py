import threading

import numpy as np
import pytest
import torch
from _helpers import TINY, smooth_image

import napari_hdn
from napari_hdn.engine import (
    DeviceError,
    GaussianNoiseModel,
    InputError,
    NoiseModel,
    StopFlag,
    TrainingDivergedError,
    load_model,
    resolve_device,
)

FAST = dict(TINY, patch_size=32, batch_size=8, bn_chunk=4, device="cpu", lr=3e-3)
#: a fixed thread count for tests that compare runs exactly: with threads=None the governor may
#: change the count on a busy machine, and sums over other thread counts round differently
EXACT = dict(FAST, threads=1)


def _data(n=2, shape=(64, 64), sigma=20.0, seed=0):
    rng = np.random.default_rng(seed)
    clean = np.stack([smooth_image(shape, seed + k) for k in range(n)])
    return clean, (clean + rng.normal(0, sigma, clean.shape)).astype(np.float32)


def _psnr(x, gt):
    return 10 * np.log10((gt.max() - gt.min()) ** 2 / np.mean((x - gt) ** 2))


def test_short_training_lowers_loss_and_denoises():
    clean, noisy = _data(n=4, shape=(64, 64), sigma=20.0)
    events = []
    model = napari_hdn.train(
        noisy, GaussianNoiseModel(20.0), axes="SYX", **{**FAST, "filters": 16, "z_dim": 4},
        max_steps=150, steps_per_epoch=25, val_fraction=0.25, callbacks=events.append,
    )
    steps = [e for e in events if e.kind == "step"]
    epochs = [e for e in events if e.kind == "epoch"]
    assert len(steps) == 150 and len(epochs) == 6 and events[-1].kind == "done"
    first = np.mean([e.metrics["train_loss"] for e in steps[:10]])
    last = np.mean([e.metrics["train_loss"] for e in steps[-10:]])
    assert last < first - 0.1
    assert len(epochs[0].metrics["kl_per_level"]) == 2
    res = model.predict(noisy[0], n_samples=20)
    gain = _psnr(res.mmse, clean[0]) - _psnr(noisy[0], clean[0])
    assert gain > 3.0, gain  # a clear margin over the noisy input


def test_seed_makes_cpu_run_reproducible():
    _, noisy = _data()
    a = napari_hdn.train(noisy, GaussianNoiseModel(20.0), **FAST, max_steps=4, seed=7)
    b = napari_hdn.train(noisy, GaussianNoiseModel(20.0), **FAST, max_steps=4, seed=7)
    c = napari_hdn.train(noisy, GaussianNoiseModel(20.0), **FAST, max_steps=4, seed=8)
    sa, sb, sc = (m.ladder.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_stop_within_one_step_keeps_a_usable_model(tmp_path):
    _, noisy = _data()
    stop = StopFlag()
    seen = []

    def cb(ev):
        if ev.kind == "step":
            seen.append(ev.step)
            if ev.step == 3:
                stop.set()

    model = napari_hdn.train(noisy, GaussianNoiseModel(20.0), **FAST, max_steps=1000,
                             steps_per_epoch=2, stop_flag=stop, callbacks=cb,
                             checkpoint_dir=tmp_path)
    assert max(seen) == 3  # no step after the request
    assert model.info["stopped_early"] and model.info["steps"] == 3
    assert (tmp_path / "last.hdn").exists() and (tmp_path / "best.hdn").exists()
    assert model.predict(noisy[0], n_samples=2).mmse.shape == (64, 64)


def test_stop_from_another_thread(tmp_path):
    _, noisy = _data()
    stop = StopFlag()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("m", napari_hdn.train(
        noisy, GaussianNoiseModel(20.0), **FAST, max_steps=100000, stop_flag=stop)))
    t.start()
    stop.set()
    t.join(timeout=60)
    assert not t.is_alive() and out["m"].info["steps"] < 100000


def test_checkpoint_and_resume(tmp_path):
    _, noisy = _data()
    napari_hdn.train(noisy, GaussianNoiseModel(20.0), **EXACT, max_steps=6, steps_per_epoch=3,
                     checkpoint_dir=tmp_path / "a")
    ck = tmp_path / "a" / "last.hdn"
    assert load_model(ck).info["steps"] == 6  # a checkpoint is a usable model file
    events = []
    resumed = napari_hdn.train(noisy, None, **EXACT, max_steps=9, steps_per_epoch=3,
                               resume=ck, callbacks=events.append, checkpoint_dir=tmp_path / "b")
    steps = [e.step for e in events if e.kind == "step"]
    assert steps == [7, 8, 9]
    assert resumed.info["steps"] == 9 and resumed.info["epochs"] == 3
    # resuming continues exactly like an uninterrupted run
    full = napari_hdn.train(noisy, GaussianNoiseModel(20.0), **EXACT, max_steps=9,
                            steps_per_epoch=3, checkpoint_dir=tmp_path / "c")
    last_b = load_model(tmp_path / "b" / "last.hdn").ladder.state_dict()
    last_c = load_model(tmp_path / "c" / "last.hdn").ladder.state_dict()
    assert all(torch.allclose(last_b[k], last_c[k], atol=1e-6) for k in last_b)
    del full


class _NaNNoise(NoiseModel):
    """Finite where the checks before training probe it (no gradient), NaN in training: a loss
    that diverges once training runs (a model NaN everywhere is refused before it starts)."""

    kind = "nan-test"

    def log_likelihood(self, x, s):
        return s * float("nan") if s.requires_grad else -(x - s) ** 2

    def sample(self, s, generator=None):
        return s

    def moments(self, s):
        return s, torch.ones_like(s)

    def get_state(self):
        return {}, {}

    @classmethod
    def from_state(cls, params, tensors):
        return cls()


def test_nan_guard_stops_with_clear_error(tmp_path):
    _, noisy = _data()
    with pytest.raises(TrainingDivergedError, match="NaN/inf for 5 batches"):
        napari_hdn.train(noisy, _NaNNoise(), **FAST, max_steps=50, max_bad_batches=5,
                         checkpoint_dir=tmp_path)


def test_bad_training_input():
    _, noisy = _data()
    with pytest.raises(InputError, match="noise model is required"):
        napari_hdn.train(noisy, None, **FAST)
    with pytest.raises(InputError, match="smaller than the patch size"):
        napari_hdn.train(noisy[0][:20, :20], GaussianNoiseModel(1.0), **FAST)
    with pytest.raises(InputError, match="constant"):
        napari_hdn.train(np.ones((64, 64)), GaussianNoiseModel(1.0), **FAST, val_fraction=0)
    with pytest.raises(TypeError, match="unknown training option"):
        napari_hdn.train(noisy, GaussianNoiseModel(1.0), levles=3)


def test_device_choice():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="Unknown device"):
        resolve_device("tpu")


def test_training_time_deactivated_levels():
    _, noisy = _data()
    model = napari_hdn.train(noisy, GaussianNoiseModel(20.0), **FAST, max_steps=2,
                             deactivated_levels=[1])
    assert model.default_modes() == ["prior-sample", "posterior"]
    with pytest.raises(InputError, match="deactivated during training"):
        model.predict(noisy[0], n_samples=1, levels=["posterior", "posterior"])


def test_warmup_raises_the_rate_linearly_then_hands_over():
    _, noisy = _data()
    lrs = []
    napari_hdn.train(noisy, GaussianNoiseModel(20.0), **FAST, max_steps=6, warmup_steps=3,
                     callbacks=lambda e: e.kind == "step" and lrs.append(e.metrics["lr"]))
    peak = FAST["lr"]
    assert lrs == pytest.approx([peak * 0.25, peak * 0.5, peak * 0.75, peak, peak, peak])


def _with_saved_settings(path, **fields):
    """Rewrite the checkpoint ``path`` as if an earlier version had saved ``fields`` with it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ck = json.loads(meta["checkpoint"])
    ck["training_config"].update(fields)
    meta["checkpoint"] = json.dumps(ck)
    save_file(tensors, str(path), metadata=meta)


def test_checkpoints_with_settings_of_earlier_versions_resume(tmp_path):
    """Settings this version no longer has are dropped on resume; one under which the old run
    trained otherwise (a learning-rate schedule other than the plateau one) is named in a
    warning, and the run goes on."""
    import warnings

    _, noisy = _data()
    napari_hdn.train(noisy, GaussianNoiseModel(20.0), **EXACT, max_steps=4, steps_per_epoch=2,
                     checkpoint_dir=tmp_path / "a")
    ck = tmp_path / "a" / "last.hdn"
    _with_saved_settings(ck, channels_last=True, lr_schedule="plateau", lr_final_fraction=0.02,
                         cooldown_fraction=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error", napari_hdn.HDNWarning)
        again = napari_hdn.train(noisy, None, max_steps=6, resume=ck)
    assert again.info["steps"] == 6
    assert "channels_last" not in again.info["training_config"]
    _with_saved_settings(ck, lr_schedule="cooldown")
    with pytest.warns(napari_hdn.HDNWarning, match=r"lr_schedule 'cooldown', which this version "
                      r"does not have: .* with lr_schedule 'plateau'"):
        again = napari_hdn.train(noisy, None, max_steps=6, resume=ck)
    assert again.info["steps"] == 6


def test_ema_weights_are_validated_returned_and_resumed_exactly(tmp_path):
    _, noisy = _data()
    opts = dict(EXACT, ema_decay=0.9, steps_per_epoch=3)
    model = napari_hdn.train(noisy, GaussianNoiseModel(20.0), **opts, max_steps=6,
                             checkpoint_dir=tmp_path / "a")
    ck = tmp_path / "a" / "last.hdn"
    # the returned weights are the average, not the raw weights of the last step
    from napari_hdn.engine.files.safeio import read_file

    _, tensors = read_file(ck, "napari-hdn-model", "model")
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    raw = {k[7:]: v for k, v in tensors.items() if k.startswith("ladder.")}
    assert ema and set(ema) == set(raw)
    assert not all(torch.equal(ema[k], raw[k]) for k in raw)
    best = model.ladder.state_dict()
    assert any(torch.equal(best[k], ema[k]) for k in best if best[k].is_floating_point())
    # resuming restores the average: same result as an uninterrupted run
    napari_hdn.train(noisy, None, **opts, max_steps=9, resume=ck, checkpoint_dir=tmp_path / "b")
    napari_hdn.train(noisy, GaussianNoiseModel(20.0), **opts, max_steps=9, checkpoint_dir=tmp_path / "c")
    _, tb = read_file(tmp_path / "b" / "last.hdn", "napari-hdn-model", "model")
    _, tc = read_file(tmp_path / "c" / "last.hdn", "napari-hdn-model", "model")
    for k in tb:
        if k.startswith(("ema.", "ladder.")):
            assert torch.allclose(tb[k].float(), tc[k].float(), atol=1e-6), k


def test_time_budget_stops_training_and_is_reported():
    _, noisy = _data()
    events = []
    model = napari_hdn.train(noisy, GaussianNoiseModel(20.0), **FAST, max_steps=10**6,
                             time_budget_s=0.5, steps_per_epoch=1000, callbacks=events.append)
    steps = [e for e in events if e.kind == "step"]
    assert 1 <= len(steps) < 10**6 and events[-1].kind == "done"
    assert steps[-1].metrics["time_budget_s"] == 0.5
    assert 0.5 <= steps[-1].metrics["train_seconds"] < 5
    assert not model.info["stopped_early"]
    assert model.info["training_seconds"] == pytest.approx(steps[-1].metrics["train_seconds"])


def test_snapshot_returns_the_weights_training_would_return():
    _, noisy = _data()
    tr = napari_hdn.Trainer(noisy, GaussianNoiseModel(20.0), training_overrides=dict(
        patch_size=32, batch_size=8, bn_chunk=4, device="cpu", ema_decay=0.5, steps_per_epoch=2,
        max_steps=4), model_config=napari_hdn.ModelConfig(**TINY))
    snaps = []
    tr.report.callbacks.append(lambda e: e.kind == "epoch" and snaps.append(tr.snapshot()))
    final = tr.run()
    assert len(snaps) == 2
    a, b = snaps[-1].ladder.state_dict(), final.ladder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert snaps[-1].ladder is not tr.model.ladder and not snaps[-1].ladder.training


@pytest.mark.parametrize("filters, batch, expected", [(32, 16, 16), (64, 64, 8), (8, 16, 16),
                                                      (64, 4, 4)])
def test_cpu_micro_batch_scales_with_the_filters(filters, batch, expected):
    """CPU passes of 512 / filters patches in whole BatchNorm chunks, never more than the batch."""
    from napari_hdn.engine import ModelConfig, Trainer, TrainingConfig

    _, noisy = _data(n=2, shape=(64, 64))
    tr = Trainer(noisy, GaussianNoiseModel(20.0), axes="SYX",
                 model_config=ModelConfig(levels=2, z_dim=4, filters=filters, blocks=1),
                 training_config=TrainingConfig(patch_size=32, batch_size=batch, device="cpu",
                                                val_fraction=0.0, bn_chunk=4))
    assert tr._micro_batch() == expected


def test_training_on_a_suspicious_noise_model_warns_before_it_starts():
    from napari_hdn.engine import SuspiciousNoiseModelWarning

    _, noisy = _data(n=2)
    nm = GaussianNoiseModel(20.0)
    nm.info = {"verdict": "suspicious", "source": "n2v", "reasons": [
        "the model's noise std differs from the data's by -21% at signal 2.344e+04"]}
    events = []
    with pytest.warns(SuspiciousNoiseModelWarning, match="judged suspicious: the model's noise "
                      "std differs.*more Noise2Void steps"):
        napari_hdn.train(noisy, nm, axes="SYX", callbacks=events.append, **{**FAST, "max_steps": 1})
    assert "suspicious" in events[0].metrics["noise_warning"]


def test_busy_monitor_notices_another_process_on_the_cores():
    import subprocess
    import sys
    import time

    from napari_hdn.engine.threads import BusyMonitor

    mon = BusyMonitor(every_s=0.5)
    if mon._last is None:
        pytest.skip("no /proc/stat on this system: the monitor is Linux only")
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 3\n"
                             "while time.time() < t: pass"])
    try:
        said = None
        deadline = time.monotonic() + 2.5
        while said is None and time.monotonic() < deadline:
            time.sleep(0.6)
            said = mon.poll()
    finally:
        spin.kill()
    assert said is not None and mon.load >= 0.5, mon.load
    assert "other processes are keeping about" in said and "cores busy" in said
