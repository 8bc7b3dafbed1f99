"""The widgets on images with channels (RGB layers, layers with a C axis) and on lazy layers."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import smooth_image
from _widget_helpers import WAIT, dock, set_tiny

from napari_hdn.engine import GaussianNoiseModel
from napari_hdn.engine.network.multichannel import MultiChannelModel
from napari_hdn.engine.noise.channels import ChannelNoiseModels
from napari_hdn.widgets import get_session
from napari_hdn.widgets._base import TaskState

pytestmark = pytest.mark.usefixtures("widget_session")


def _wait(qtbot, w, timeout=WAIT):
    qtbot.waitUntil(lambda: not w.task.running, timeout=timeout)


def test_rgb_layer_noise_model_training_and_prediction_per_channel(viewer, qtbot, notes):
    rng = np.random.default_rng(0)
    clean = np.stack([smooth_image((64, 64), k) * 2 + 20 for k in range(3)], axis=-1)
    rgb = np.clip(clean + rng.normal(0, 8, clean.shape), 0, 255).astype(np.uint8)
    layer = viewer.add_image(rgb, name="skin", rgb=True, scale=(0.5, 0.5))
    assert layer.rgb
    # a noise model per colour channel, bootstrapped with Noise2Void
    nw = dock(viewer, "Noise model")
    nw.set_source("n2v")
    nw.n2v_layer.set_layer("skin")
    assert nw.n2v_axes.currentText() == "YXC" and not nw.n2v_axes.isEnabled()
    nw.n2v_steps.setValue(5)
    assert nw.fit()
    _wait(qtbot, nw)
    assert nw.state == TaskState.DONE, notes.errors
    nm = nw.last_entry.model
    assert isinstance(nm, ChannelNoiseModels) and len(nm) == 3
    assert nw.verdict.text().count("Channel") == 3 and "cut short" in nw.verdict.text()
    # training: one HDN per channel; the warning about the suspicious fits comes first
    tw = dock(viewer, "Training")
    tw.layer_combo.set_layer("skin")
    tw.noise_combo.setCurrentText(nw.last_entry.name)
    assert tw.axes_combo.currentText() == "YXC"
    assert not tw.noise_note.isHidden() and "channel 1:" in tw.noise_note.text()
    set_tiny(tw, steps=2)
    tw.patch.setValue(32)
    tw.val_fraction.setValue(0.0)
    assert tw.start_training()
    _wait(qtbot, tw)
    assert tw.state == TaskState.DONE, (tw.status.text(), notes.errors)
    assert any("suspicious" in w for w in notes.warnings)
    entry = tw.model_combo.current_entry()
    assert isinstance(entry.model, MultiChannelModel) and entry.model.channels == 3
    assert entry.model.info["channel_names"] == ["R", "G", "B"] and "3 channels" in entry.name
    # prediction: RGB layers back, at the input's scale
    pw = dock(viewer, "Predict and explore")
    pw.model_combo.setCurrentText(entry.name)
    pw.layer_combo.set_layer("skin")
    pw.n_samples.setValue(2)
    assert pw.run_prediction()
    _wait(qtbot, pw)
    assert pw.state == TaskState.DONE, (pw.status.text(), notes.errors)
    mmse = viewer.layers["HDN MMSE · skin"]
    assert mmse.rgb and mmse.data.shape == (64, 64, 3)
    assert tuple(mmse.scale) == (0.5, 0.5)
    samples = viewer.layers["HDN samples · skin"]
    assert samples.rgb and samples.data.shape == (2, 64, 64, 3)


def test_channel_axis_layer_and_a_model_that_does_not_fit(viewer, qtbot, notes):
    rng = np.random.default_rng(1)
    clean = np.stack([smooth_image((64, 64), 0), 50 + 2 * smooth_image((64, 64), 4)])
    data = (clean + rng.normal(0, 5, clean.shape)).astype(np.float32)
    viewer.add_image(data, name="two", scale=(0.2, 0.2))
    get_session().add_noise_model(GaussianNoiseModel(5.0), "g5")
    tw = dock(viewer, "Training")
    tw.layer_combo.set_layer("two")
    tw.axes_combo.setCurrentText("CYX")
    set_tiny(tw, steps=2)
    tw.patch.setValue(32)
    tw.val_fraction.setValue(0.0)
    assert tw.start_training()
    _wait(qtbot, tw)
    assert tw.state == TaskState.DONE, (tw.status.text(), notes.errors)
    entry = tw.model_combo.current_entry()
    assert isinstance(entry.model, MultiChannelModel) and entry.axes == "CYX"
    assert entry.model.info["steps"] == [2, 2]
    # Resume trains every channel on for 'Steps' more steps, from its checkpoint folder
    tw.steps.setValue(3)
    assert tw.resume_training()
    _wait(qtbot, tw)
    assert tw.state == TaskState.DONE, (tw.status.text(), notes.errors)
    resumed = tw.model_combo.current_entry()
    assert resumed is not entry and resumed.model.info["steps"] == [5, 5]
    pw = dock(viewer, "Predict and explore")
    pw.model_combo.setCurrentText(entry.name)
    pw.layer_combo.set_layer("two")
    assert pw.axes_combo.currentText() == "CYX"  # the axes it was trained on
    pw.n_samples.setValue(2)
    assert pw.run_prediction()
    _wait(qtbot, pw)
    mmse = viewer.layers["HDN MMSE · two"]
    assert mmse.data.shape == (2, 64, 64) and tuple(mmse.axis_labels)[0] == "C"
    assert tuple(mmse.scale)[-2:] == (0.2, 0.2)
    # a one-channel layer is refused, naming the channels; nothing is added
    viewer.add_image(data[0], name="one")
    pw.layer_combo.set_layer("one")
    n = len(viewer.layers)
    assert not pw.run_prediction()
    assert "trained on 2 channels" in notes.errors[-1] and len(viewer.layers) == n
    # the artefact widget says what to do with a model per channel
    aw = dock(viewer, "Artefact removal")
    aw.model_combo.setCurrentText(entry.name)
    aw.layer_combo.set_layer("one")
    assert not aw.request_preview()
    assert "one HDN per channel" in notes.errors[-1]


def test_training_from_a_dask_layer_reads_it_on_demand(viewer, qtbot, notes):
    """A lazy layer (dask) trains without being loaded whole."""
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(2)
    stack = (100 + 10 * rng.normal(size=(6, 64, 64))).astype(np.float32)
    computed = []
    lazy = da.from_array(stack, chunks=(1, 64, 64))
    viewer.add_image(lazy, name="lazy")
    get_session().add_noise_model(GaussianNoiseModel(10.0), "g10")
    tw = dock(viewer, "Training")
    tw.layer_combo.set_layer("lazy")
    set_tiny(tw, steps=2)
    tw.patch.setValue(32)
    import napari_hdn.widgets.train_widget as twm

    real = twm.check_image_layer
    twm.check_image_layer = lambda *a, **k: computed.append(1) or real(*a, **k)
    try:
        assert tw.start_training()
        _wait(qtbot, tw)
    finally:
        twm.check_image_layer = real
    assert tw.state == TaskState.DONE, (tw.status.text(), notes.errors)
    assert computed == []  # the layer's data were never turned into one array
    assert tw.model_combo.current_entry().model.info["steps"] == 2
