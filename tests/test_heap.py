"""The heap setting kept while the engine computes (engine/heap.py)."""

from __future__ import annotations

import sys
import threading

import pytest

from napari_hdn.engine import heap


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLibc()
    monkeypatch.setattr(heap, "_libc", lib)
    monkeypatch.setattr(heap, "_users", 0)
    return lib


def test_keep_heap_sets_once_and_restores_after_the_last_user(fake):
    with heap.keep_heap():
        assert fake.calls == [("mallopt", -3, heap.KEEP_MMAP), ("mallopt", -1, heap.KEEP_TRIM)]
        with heap.keep_heap():  # nested: no change
            pass
        assert len(fake.calls) == 2
    assert fake.calls[2:] == [("mallopt", -3, 128 * 1024), ("mallopt", -1, 128 * 1024),
                              ("trim", 0)]
    assert heap._users == 0


def test_keep_heap_restores_after_an_error(fake):
    with pytest.raises(RuntimeError):
        with heap.keep_heap():
            raise RuntimeError("stop")
    assert fake.calls[-1] == ("trim", 0) and heap._users == 0


def test_keep_heap_is_shared_between_threads(fake):
    inside = threading.Event()
    leave = threading.Event()

    def worker():
        with heap.keep_heap():
            inside.set()
            leave.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    with heap.keep_heap():
        pass  # the worker still holds it: nothing restored
    assert ("trim", 0) not in fake.calls
    leave.set()
    t.join(5)
    assert fake.calls.count(("trim", 0)) == 1 and heap._users == 0


@pytest.mark.parametrize("env", [{"NAPARI_HDN_KEEP_HEAP": "0"}, {"LD_PRELOAD": "libjemalloc.so"},
                                 {"MALLOC_TRIM_THRESHOLD_": "0"}])
def test_user_settings_and_opt_out_leave_the_allocator_alone(monkeypatch, env):
    monkeypatch.setattr(heap, "_libc", None)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert not heap.available()
    with heap.keep_heap():
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux's")
def test_real_glibc_round_trip(monkeypatch):
    """On this Linux machine the real calls succeed (glibc) and leave the count at zero."""
    monkeypatch.setattr(heap, "_libc", None)
    for k in heap._USER_SETTINGS + ("NAPARI_HDN_KEEP_HEAP",):
        monkeypatch.delenv(k, raising=False)
    if not heap.available():
        pytest.skip("the C library here is not glibc")
    with heap.keep_heap():
        data = bytearray(64 << 20)  # a request above glibc's largest adaptive threshold
        del data
    assert heap._users == 0


def test_cpu_training_runs_inside_keep_heap(fake):
    import numpy as np

    from napari_hdn.engine import GaussianNoiseModel, ModelConfig, Trainer, TrainingConfig

    seen = []

    def cb(event):
        if event.kind == "step":
            seen.append(heap._users)

    img = np.random.default_rng(0).normal(100, 10, (2, 32, 32)).astype(np.float32)
    tr = Trainer(img, GaussianNoiseModel(10.0), axes="SYX",
                 model_config=ModelConfig(levels=2, z_dim=4, filters=4, blocks=1),
                 training_config=TrainingConfig(patch_size=16, batch_size=2, max_steps=2,
                                                steps_per_epoch=2, val_fraction=0.0,
                                                device="cpu", seed=0),
                 callbacks=cb)
    tr.run()
    assert seen and all(u == 1 for u in seen)
    assert heap._users == 0 and fake.calls[-1] == ("trim", 0)


def test_prediction_runs_inside_keep_heap_and_gives_the_same_numbers(fake, tiny_model, monkeypatch):
    import numpy as np

    from napari_hdn.engine import predict, predict_in_rounds
    from napari_hdn.engine.prediction import run as pred_mod

    inside = []
    real = pred_mod._predict_group

    def spy(*a, **k):
        inside.append(heap._users)
        return real(*a, **k)

    monkeypatch.setattr(pred_mod, "_predict_group", spy)
    img = np.random.default_rng(1).normal(50, 30, (32, 32)).astype(np.float32)
    a = predict(tiny_model, img, n_samples=20, device="cpu")
    b = predict_in_rounds(tiny_model, img, n_samples=20, device="cpu")  # two rounds: 8 + 12
    assert inside == [1, 2, 2]  # predict; each round of predict_in_rounds inside its own
    assert heap._users == 0 and fake.calls.count(("trim", 0)) == 2  # once per call, not per round
    np.testing.assert_allclose(a.mmse, b.mmse, rtol=1e-5, atol=1e-5)
    gpu_like = heap.keep_heap("cuda")
    with gpu_like:
        assert heap._users == 0  # only CPU work changes the heap
