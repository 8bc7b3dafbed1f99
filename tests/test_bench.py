import torch
from _helpers import TINY

from napari_hdn import bench
from napari_hdn.engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation


def test_conv_flop_count_matches_hand_count():
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**TINY), GaussianNoiseModel(1.0), Normalisation(0.0, 1.0))
    x = torch.randn(2, 1, 16, 16)
    flops = bench.conv_flops_per_forward(model, x)
    # the stem conv alone: 2 * (1*5*5) MACs per output element * (2*8*16*16) outputs
    assert flops > 2 * 25 * 2 * 8 * 16 * 16
    # doubling the batch doubles the count exactly
    assert bench.conv_flops_per_forward(model, torch.randn(4, 1, 16, 16)) == 2 * flops


def test_bench_times_the_trainers_step_and_predict(monkeypatch):
    from napari_hdn.engine.training import trainer as training

    steps = []
    real = training.Trainer.train_step
    monkeypatch.setattr(training.Trainer, "train_step",
                        lambda self: steps.append(self.step) or real(self))
    training_settings = dict(patch_size=16, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9)
    r = bench.task_train("cpu", dict(TINY), training_settings, 2)
    assert steps == [0, 1, 2]  # the warm-up step and the two timed ones, as Trainer.run counts
    assert r["steps_per_s"] > 0 and r["conv_gflop_per_step"] > 0 and r["peak_memory_mb"] > 0
    assert (r["batch_size"], r["patch_size"]) == (8, 16)
    calls = []
    monkeypatch.setattr(HDNModel, "predict",
                        lambda self, img, **kw: calls.append((img.shape, kw["n_samples"])))
    p = bench.task_predict("cpu", dict(TINY), 32, 4)
    assert calls == [((32, 32), 4)] and p["seconds"] >= 0


def test_bench_prints_a_line_per_preset(monkeypatch):
    fig = dict(steps_per_s=2.0, step_seconds=0.5, train_gflops=1.0, conv_gflop_per_step=0.5,
               batch_size=16, patch_size=64, peak_memory_mb=100.0)
    fake = {"task_conv": lambda *a: {"conv2d_gflops": 10.0, "conv2d_seconds": 0.1,
                                     "peak_memory_mb": 1.0},
            "task_train": lambda *a: dict(fig), "task_predict": lambda *a: {"seconds": 1.5,
                                                                            "peak_memory_mb": 50.0}}
    monkeypatch.setattr(bench, "_run", lambda fn, *a: fake[fn.__name__](*a))
    lines = []
    res = bench.run_speed_benchmark(quick=False, device="cpu", echo=lines.append)
    assert list(res["training"]) == list(bench.TIMED_PRESETS) == list(res["prediction"])
    assert any(s.startswith("train fast CPU (batch 16, patch 64): 2.000 steps/s") and "10% of conv2d"
               in s for s in lines), lines
    assert any(s.startswith("predict paper") and "100 samples 128x128: 1.5 s" in s for s in lines)
    quick = bench.run_speed_benchmark(quick=True, device="cpu", echo=lines.append)
    assert list(quick["training"]) == ["fast CPU"]
