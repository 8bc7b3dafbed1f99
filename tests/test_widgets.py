"""Widget tests of the napari plugin (pytest-qt + make_napari_viewer, under Xvfb via pytest-xvfb).

Tiny models (2 levels, 8 filters) and a few steps keep every test to a second or two on a CPU.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from _widget_helpers import PLUGIN, WAIT, dock, set_tiny, tiny_model

from napari_hdn.widgets import (
    ArtefactWidget,
    NoiseModelWidget,
    PredictWidget,
    TrainingWidget,
    get_session,
)
from napari_hdn.widgets._base import TaskState

pytestmark = pytest.mark.usefixtures("widget_session")


def camera(viewer):
    """viewer.scene.camera from napari 0.9 on, viewer.camera before."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def wait_idle(qtbot, task, timeout=WAIT):
    qtbot.waitUntil(lambda: not task.running, timeout=timeout)


# -- manifest contributions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [("Noise model", NoiseModelWidget), ("Training", TrainingWidget),
     ("Predict and explore", PredictWidget), ("Artefact removal", ArtefactWidget)],
)
def test_widget_docks(viewer, name, cls):
    dw, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    assert isinstance(widget, cls)
    assert dw.name == name or name in dw.name


# -- end to end on sample data -------------------------------------------------------------------


def test_end_to_end_fit_train_predict(viewer, qtbot, notes):
    """Sample data -> noise model fitted on (ground truth, noisy) -> training -> predict layers."""
    viewer.open_sample(PLUGIN, "noisy-fluorescence")
    noisy = viewer.layers["noisy fluorescence"]
    noisy.scale = (0.5, 0.25)
    noisy.translate = (10.0, -3.0)

    nw = dock(viewer, "Noise model")
    nw.set_source("clean")
    nw.clean_layer.set_layer("noisy fluorescence ground truth")
    nw.clean_noisy_layer.set_layer("noisy fluorescence")
    assert nw.fit()
    wait_idle(qtbot, nw.task)
    assert nw.state == TaskState.DONE, notes.errors
    entry = nw.last_entry
    assert entry.name == "GMM k=3 d=1 · noisy fluorescence vs noisy fluorescence ground truth"
    assert entry.model.kind == "gmm"
    assert entry.model.info["verdict"] in ("good", "suspicious")
    assert "Verdict" in nw.verdict.text()
    assert nw.canvas is not None and len(nw.canvas.figure.axes) >= 2
    assert list(get_session().noise_models) == [entry.name]

    tw = dock(viewer, "Training")
    assert tw.noise_combo.currentText() == entry.name  # handed over without a file dialog
    tw.layer_combo.set_layer("noisy fluorescence")
    set_tiny(tw, steps=4)
    assert tw.start_training()
    wait_idle(qtbot, tw.task)
    assert tw.state == TaskState.DONE, notes.errors
    models = get_session().models
    assert list(models) == ["noisy fluorescence HDN (4 steps)"]
    assert tw.progress.value() == 4
    assert len(tw.plot.train) == 4 and len(tw.plot.kl[-1]) == 2
    assert tw.plot.val  # validation points

    pw = dock(viewer, "Predict and explore")
    assert pw.model_combo.currentText() == "noisy fluorescence HDN (4 steps)"
    pw.layer_combo.set_layer("noisy fluorescence")
    pw.n_samples.setValue(3)
    assert pw.run_prediction()
    wait_idle(qtbot, pw.task)
    assert pw.state == TaskState.DONE, notes.errors
    mmse = viewer.layers["HDN MMSE · noisy fluorescence"]
    var = viewer.layers["HDN variance · noisy fluorescence"]
    smp = viewer.layers["HDN samples · noisy fluorescence"]
    assert mmse.data.shape == var.data.shape == (256, 256)
    assert smp.data.shape == (3, 256, 256)
    np.testing.assert_allclose(mmse.data, smp.data.mean(0), rtol=1e-4, atol=1e-3)
    assert np.all(var.data >= 0) and np.isfinite(mmse.data).all()
    np.testing.assert_allclose(mmse.scale, (0.5, 0.25))
    np.testing.assert_allclose(mmse.translate, (10.0, -3.0))
    np.testing.assert_allclose(smp.scale, (1.0, 0.5, 0.25))
    np.testing.assert_allclose(smp.translate, (0.0, 10.0, -3.0))
    assert mmse.metadata["hdn"]["n_samples"] == 3
    assert mmse.metadata["hdn"]["levels"] == ["posterior", "posterior"]
    assert notes.errors == []

    # re-running replaces the layers' data instead of piling up new layers
    n_layers = len(viewer.layers)
    pw.n_samples.setValue(2)
    assert pw.run_prediction()
    wait_idle(qtbot, pw.task)
    assert len(viewer.layers) == n_layers
    assert viewer.layers["HDN samples · noisy fluorescence"].data.shape == (2, 256, 256)
    assert viewer.layers["HDN MMSE · noisy fluorescence"] is mmse
    assert mmse.metadata["hdn"]["n_samples"] == 2


def test_stack_training_and_prediction_keep_axes(viewer, qtbot, notes):
    rng = np.random.default_rng(0)
    stack = (50 + 10 * rng.normal(size=(4, 48, 40))).astype(np.float32)
    viewer.add_image(stack, name="stack")
    from napari_hdn.engine import GaussianNoiseModel

    get_session().add_noise_model(GaussianNoiseModel(10.0), "g10")
    tw = dock(viewer, "Training")
    assert tw.axes_combo.isEnabled()
    assert [tw.axes_combo.itemText(i) for i in range(tw.axes_combo.count())] == [
        "TYX", "ZYX", "SYX", "CYX"]
    tw.axes_combo.setCurrentText("ZYX")
    set_tiny(tw, steps=2)
    tw.val_fraction.setValue(0.25)  # one of the 4 slices held out for validation
    assert tw.start_training()
    wait_idle(qtbot, tw.task)
    entry = next(iter(get_session().models.values()))
    assert entry.axes == "ZYX" and entry.model.info["axes"] == "ZYX"
    pw = dock(viewer, "Predict and explore")
    assert pw.axes_combo.currentText() == "ZYX"  # the model's axes, not the first choice (TYX)
    pw.n_samples.setValue(2)
    pw.keep_samples.setChecked(False)
    assert pw.run_prediction()
    wait_idle(qtbot, pw.task)
    assert viewer.layers["HDN MMSE · stack"].data.shape == (4, 48, 40)
    assert "HDN samples · stack" not in viewer.layers
    assert notes.errors == []


def test_stopping_a_prediction_keeps_the_samples_drawn(viewer, qtbot, notes, monkeypatch):
    """Item 8: a stopped 5000-sample prediction keeps the MMSE/variance of what it drew, labelled."""
    import re

    from napari_hdn.engine import predict

    img = np.random.default_rng(3).normal(50, 5, (64, 64)).astype(np.float32)
    viewer.add_image(img, name="img")
    entry = get_session().add_model(tiny_model(img), "tiny")
    pw = dock(viewer, "Predict and explore")
    pw.n_samples.setValue(5000)
    pw.seed.setValue(4)
    assert pw.run_prediction()
    qtbot.waitUntil(lambda: pw.progress.value() >= 20, timeout=WAIT)
    pw.stop_btn.click()
    wait_idle(qtbot, pw.task, timeout=10_000)
    assert pw.state == TaskState.STOPPED and pw.run_btn.isEnabled()
    names = [ly.name for ly in viewer.layers if ly.name != "img"]
    assert len(names) == 3, names
    mmse_name = next(n for n in names if n.startswith("HDN MMSE · img · "))
    count = int(re.fullmatch(r"HDN MMSE · img · (\d+) of 5000 samples", mmse_name).group(1))
    assert 16 <= count < 5000
    mmse = viewer.layers[mmse_name]
    smp = viewer.layers[f"HDN samples · img · {count} of 5000 samples"]
    assert smp.data.shape == (count, 64, 64)
    assert mmse.metadata["hdn"]["n_samples"] == count and mmse.metadata["hdn"]["stopped"] is True
    # exactly what a prediction of `count` samples with the same seed gives
    ref = predict(entry.model, img, n_samples=count, seed=4)
    np.testing.assert_allclose(mmse.data, ref.mmse, rtol=1e-5, atol=1e-4)
    assert f"Stopped after {count} of 5000 samples" in pw.status.text()
    assert any(f"kept the {count} samples" in m for m in notes.infos)
    assert notes.errors == []

    # stopped before the first round finished: nothing to keep, no layer changed
    from napari_hdn.engine import StopRequested

    def stop_at_once(*a, **k):
        raise StopRequested("stopped on request")

    monkeypatch.setattr("napari_hdn.widgets.predict_widget.predict_in_rounds", stop_at_once)
    n_layers = len(viewer.layers)
    assert pw.run_prediction()
    wait_idle(qtbot, pw.task)
    assert pw.state == TaskState.STOPPED and len(viewer.layers) == n_layers
    assert "no layers were changed" in pw.status.text()


# -- training: stop, responsiveness, resume, save ------------------------------------------------


def test_stop_ends_training_quickly_and_keeps_a_usable_model(make_napari_viewer, qtbot, notes,
                                                             tmp_path):
    viewer = make_napari_viewer(show=True)  # shown: the canvas and the live plot really draw
    rng = np.random.default_rng(1)
    viewer.add_image((100 + 5 * rng.normal(size=(96, 96))).astype(np.float32), name="img")
    from napari_hdn.engine import GaussianNoiseModel

    get_session().add_noise_model(GaussianNoiseModel(5.0), "g5")
    tw = dock(viewer, "Training")
    set_tiny(tw, steps=100000)
    assert tw.start_training()
    assert not tw.train_btn.isEnabled() and tw.stop_btn.isEnabled()
    qtbot.waitUntil(lambda: len(tw.plot.train) >= 3, timeout=WAIT)

    # the viewer keeps working while training runs: events are processed, camera and selection change
    ticks = []
    t_end = time.perf_counter() + 1.0
    while time.perf_counter() < t_end:
        ticks.append(time.perf_counter())
        camera(viewer).center = (0, 40 + len(ticks) % 7, 40)
        viewer.layers.selection.active = viewer.layers["img"]
        qtbot.wait(20)
    gaps = np.diff(ticks)
    assert gaps.max() < 0.5, f"GUI thread blocked for {gaps.max():.2f} s during training"
    assert len(ticks) > 10 and tw.task.running
    assert tw.plot.draws >= 1  # the live plot was drawn meanwhile

    t0 = time.perf_counter()
    tw.stop_btn.click()
    assert tw.state == TaskState.STOPPING
    wait_idle(qtbot, tw.task, timeout=10_000)
    assert time.perf_counter() - t0 < 5.0
    assert tw.state == TaskState.STOPPED
    entry = tw.model_combo.current_entry()
    assert entry is not None and entry.model.info["stopped_early"] is True
    assert 0 < entry.steps < 100000
    assert any("Stopped at step" in m for m in notes.infos)
    res = entry.model.predict(viewer.layers["img"].data, n_samples=2)
    assert np.isfinite(res.mmse).all()

    # resume continues from the checkpoint for 'Steps' more steps, and the live plot continues
    before = list(tw.plot.train)
    tw.plot.reset()  # whatever the plot shows now, Resume shows the curves of the model it resumes
    tw.steps.setValue(2)
    assert tw.resume_training()
    wait_idle(qtbot, tw.task)
    assert tw.state == TaskState.DONE, notes.errors
    new = tw.model_combo.current_entry()
    assert new is not entry and new.steps == entry.steps + 2
    assert new.name == f"img HDN ({entry.steps + 2} steps)"
    assert tw.plot.train[:len(before)] == before and len(tw.plot.train) == len(before) + 2
    assert tw.plot.steps[-1] == new.steps

    path = tw.save_model(tmp_path / "trained")
    assert path == tmp_path / "trained.hdn" and path.exists()
    from napari_hdn.engine import load_model

    assert load_model(path).info["steps"] == new.steps


# -- artefact removal ---------------------------------------------------------------------------


@pytest.fixture
def striped(viewer):
    viewer.open_sample(PLUGIN, "striped-fluorescence")
    layer = viewer.layers["striped fluorescence"]
    model = tiny_model(layer.data[:128, :128], steps=2)
    entry = get_session().add_model(model, "tiny")
    return layer, entry


def test_toggling_a_level_changes_the_preview(viewer, qtbot, notes, striped):
    layer, entry = striped
    aw = dock(viewer, "Artefact removal")
    assert aw.model_combo.currentText() == "tiny"
    aw.layer_combo.set_layer(layer.name)
    assert sorted(aw.mode_boxes) == [1, 2]
    aw.region.setCurrentText("crop")
    aw.crop_y.setValue(37)  # aligned down to a multiple of 2**levels
    aw.crop_x.setValue(64)
    aw.crop_size.setValue(96)
    assert aw.request_preview()
    qtbot.waitUntil(lambda: aw.previews_done == 1, timeout=WAIT)
    prev = viewer.layers["HDN preview · striped fluorescence"]
    first = prev.data.copy()
    assert first.shape == (96, 96)
    np.testing.assert_allclose(prev.translate, (36, 64))
    assert aw.last_preview["cached"] is False

    aw.mode_boxes[1].setCurrentText("zero")  # a user toggle: the preview follows by itself
    qtbot.waitUntil(lambda: aw.previews_done == 2, timeout=WAIT)
    # the first level switched off also describes the levels (for the verdicts and warnings)
    # without changing the user's choice
    qtbot.waitUntil(lambda: aw.level_report is not None, timeout=WAIT)
    assert aw.level_modes()[0] == "zero"
    assert aw.last_preview["cached"] is True  # bottom-up pass reused
    assert prev.metadata["hdn"]["levels_off"] == {1: "zero"}
    assert np.abs(prev.data - first).mean() > 1e-3
    assert aw.last_preview_seconds < 5.0

    aw.set_level_mode(1, "posterior")
    qtbot.waitUntil(lambda: aw.previews_done == 3, timeout=WAIT)
    np.testing.assert_allclose(prev.data, first, rtol=1e-5, atol=1e-4)  # same seed, same sample
    assert notes.errors == []


def test_apply_adds_layers_that_record_the_levels(viewer, qtbot, notes, striped):
    layer, entry = striped
    aw = dock(viewer, "Artefact removal")
    aw.live.setChecked(False)
    aw.layer_combo.set_layer(layer.name)
    aw.set_level_modes({1: "prior-mean", 2: "posterior"})
    aw.apply_samples.setValue(2)
    assert aw.apply()
    wait_idle(qtbot, aw.apply_task)
    assert aw.state == TaskState.DONE, notes.errors
    name = "HDN MMSE · striped fluorescence · L1 prior-mean"
    mm = viewer.layers[name]
    var = viewer.layers["HDN variance · striped fluorescence · L1 prior-mean"]
    assert mm.data.shape == var.data.shape == layer.data.shape
    assert mm.metadata["hdn"]["levels_off"] == [1]
    assert mm.metadata["hdn"]["levels"] == ["prior-mean", "posterior"]
    assert "HDN preview · striped fluorescence" not in viewer.layers  # live preview was off


def test_preview_follows_the_visible_region_and_frame(make_napari_viewer, qtbot, notes):
    viewer = make_napari_viewer(show=True)  # the visible region is known once the canvas is drawn
    rng = np.random.default_rng(2)
    stack = (100 + 10 * rng.normal(size=(3, 200, 240))).astype(np.float32)
    layer = viewer.add_image(stack, name="movie", scale=(1.0, 0.5, 0.5))
    from napari_hdn.engine import GaussianNoiseModel, train

    # three levels: crop origins are multiples of 8, which a preview must not let pull it off-centre
    model = train(stack[0, :64, :64], GaussianNoiseModel(3.0), levels=3, z_dim=2, filters=8,
                  blocks=1, dropout=0.0, patch_size=32, batch_size=8, max_steps=1, device="cpu",
                  steps_per_epoch=1, seed=0)
    get_session().add_model(model, "tiny")
    aw = dock(viewer, "Artefact removal")
    aw.layer_combo.set_layer("movie")
    viewer.dims.set_current_step(0, 2)
    cam = camera(viewer)
    cam.center = (0.0, 30.5, 78.5)  # world coordinates (scale 0.5): data row 61, col 157
    cam.zoom = 8.0
    qtbot.waitUntil(lambda: np.ptp(np.asarray(layer.corner_pixels)[:, -1]) < 150, timeout=5000)
    a, b = np.asarray(layer.corner_pixels)[:, -2:]
    assert (b - a).max() < 150  # zoomed in: only part of the frame is visible
    assert aw.request_preview()
    qtbot.waitUntil(lambda: aw.previews_done == 1, timeout=WAIT)
    prev = viewer.layers["HDN preview · movie"]
    info = prev.metadata["hdn"]
    assert info["frame"] == [2]
    y0, x0 = info["origin"]
    h, w = prev.data.shape[-2:]
    assert prev.data.shape[0] == 1 and 64 <= h <= 150 and 64 <= w <= 150
    assert y0 % 8 == 0 and x0 % 8 == 0
    # centred on the view (item 9 of issue 12: it was off-centre by up to 2**L - 1 pixels)
    assert abs(y0 + h / 2 - 61) <= 1 and abs(x0 + w / 2 - 157) <= 1, (y0, x0, h, w)
    np.testing.assert_allclose(prev.translate, (2.0, y0 * 0.5, x0 * 0.5))
    np.testing.assert_allclose(prev.scale, (1.0, 0.5, 0.5))
    assert notes.errors == []


# -- bad input: notifications, not exceptions ------------------------------------------------------


def _errors_after(notes, fn):
    notes.clear()
    out = fn()
    return out, notes.errors


def test_bad_inputs_give_notifications(viewer, qtbot, notes, monkeypatch):
    from napari_hdn.engine import GaussianNoiseModel

    tw = dock(viewer, "Training")
    # no layer at all
    ok, errs = _errors_after(notes, tw.start_training)
    assert not ok and "no image layer" in errs[0]

    viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="rgb", rgb=True)
    viewer.add_labels(np.zeros((64, 64), int), name="seg")
    viewer.add_image(np.zeros((2, 2, 2, 2, 40, 40), np.float32), name="six")
    viewer.add_image(np.random.default_rng(0).normal(size=(20, 20)).astype(np.float32), name="tiny")
    good = viewer.add_image(np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32),
                            name="good")

    # missing noise model
    tw.layer_combo.set_layer("good")
    ok, errs = _errors_after(notes, tw.start_training)
    assert not ok and "no noise model" in errs[0] and "Noise model widget" in errs[0]
    get_session().add_noise_model(GaussianNoiseModel(1.0), "g1")
    set_tiny(tw, steps=2)
    viewer.add_image(np.zeros((64, 64), np.float32), name="blank")  # napari has no 0-size images
    # (an RGB layer trains a model per colour channel: this one is blank)
    cases = {"rgb": "blank", "seg": "Labels layer", "six": "6 dimensions",
             "tiny": "too small for Patch size 32", "blank": "blank"}
    for name, needle in cases.items():
        tw.layer_combo.set_layer(name)
        ok, errs = _errors_after(notes, tw.start_training)
        assert not ok and len(errs) == 1 and needle in errs[0], (name, errs)
        assert tw.state == TaskState.IDLE and tw.train_btn.isEnabled()

    # CUDA where there is none
    tw.layer_combo.set_layer("good")
    if not torch.cuda.is_available():
        tw.device.setCurrentIndex(tw.device.findData("cuda"))
        assert "not available" in tw.device.currentText()
        ok, errs = _errors_after(notes, tw.start_training)
        assert not ok and "not available" in errs[0] and "cpu" in errs[0]

    # invalid training-time level list
    tw.device.setCurrentIndex(tw.device.findData("cpu"))
    tw.deactivated.setText("1,x")
    ok, errs = _errors_after(notes, tw.start_training)
    assert not ok and "levels off" in errs[0]
    tw.deactivated.setText("")

    # a model trained with a different number of levels than the level controls expect
    entry = get_session().add_model(tiny_model(good.data), "two-level")
    aw = dock(viewer, "Artefact removal")
    aw.layer_combo.set_layer("good")
    ok, errs = _errors_after(notes, lambda: aw.set_level_modes({3: "zero", 4: "zero"}))
    assert not ok and "has 2 levels" in errs[0]
    assert aw.level_modes() == ["posterior", "posterior"]

    # out of memory during prediction: reported, widget usable again
    pw = dock(viewer, "Predict and explore")
    pw.layer_combo.set_layer("good")
    pw.n_samples.setValue(2)

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("napari_hdn.widgets.predict_widget.predict_in_rounds", oom)
    notes.clear()
    assert pw.run_prediction()
    wait_idle(qtbot, pw.task)
    assert pw.state == TaskState.FAILED
    assert len(notes.errors) == 1 and "Out of memory" in notes.errors[0]
    assert pw.run_btn.isEnabled()
    monkeypatch.undo()
    assert entry.model.levels == 2

    # prediction of a Labels layer, and an empty model choice
    pw.layer_combo.set_layer("seg")
    ok, errs = _errors_after(notes, pw.run_prediction)
    assert not ok and "Labels layer" in errs[0]


def test_suggest_selects_levels_and_fine_tune_adds_a_model(viewer, qtbot, notes, striped):
    """Suggest describes each level beside it and selects the suggestion; a level whose removal
    reads as image detail raises the warning; Fine-tune adds a model with the levels withheld and
    keeps the prediction-time preview for comparison."""
    from napari_hdn.engine.prediction.levels import LevelReport, LevelStep

    layer, entry = striped
    aw = dock(viewer, "Artefact removal")
    aw.layer_combo.set_layer(layer.name)
    aw.region.setCurrentText("crop")
    aw.crop_size.setValue(64)
    assert aw.suggest()
    qtbot.waitUntil(lambda: aw.level_report is not None, timeout=WAIT)
    rep = aw.level_report
    assert [s.level for s in rep.steps] == [1] and aw.level_modes() == rep.suggested
    assert aw.status.text().startswith("Suggested:")
    assert aw.cost_labels[1].text() != ""  # the verdict shows beside the level
    # a report saying level 1 carries image detail: switching it off warns
    aw.level_report = LevelReport("prior-sample", [LevelStep(1, 0.5, 0.6, -0.1, "signal")],
                                  ["posterior", "posterior"], (0, 0, 64, 64), 8)
    aw.set_level_mode(1, "prior-sample")
    assert not aw.warning.isHidden() and "real detail" in aw.warning.text()
    assert "image detail" in aw.cost_labels[1].text()
    aw.set_level_mode(1, "posterior")
    assert aw.warning.isHidden()
    # fine-tune with level 1 withheld
    aw.set_level_mode(1, "prior-sample")
    qtbot.waitUntil(lambda: not aw.preview_task.running and aw.previews_done >= 1, timeout=WAIT)
    aw.tune_steps.setValue(10)
    assert aw.fine_tune()
    wait_idle(qtbot, aw.apply_task)
    assert aw.state == TaskState.DONE, notes.errors
    tuned = get_session().model(aw.model_combo.currentText())
    assert tuned is aw.tuned_entry and tuned.name == "tiny · L1 withheld"
    assert tuned.model.config.deactivated_levels == [1]
    assert aw.level_modes() == ["prior-sample", "posterior"]
    assert "HDN preview · striped fluorescence · tiny · L1 off at prediction" in viewer.layers
    qtbot.waitUntil(lambda: "HDN preview · striped fluorescence" in viewer.layers, timeout=WAIT)
    # nothing to withhold: a clear message, no job
    aw.model_combo.setCurrentText("tiny")
    assert not aw.fine_tune()
    assert "switch off the levels to withhold first" in aw.status.text()
    assert notes.errors[-1:] and "switch off the levels" in notes.errors[-1]
