"""What a microscopist met trying the workflow on the bundled samples (issue 12), one test each.

Items 3 and 9 (names) are in test_widgets_noise_reader.py, items 8 and 9 (axes, loss plot, centred
preview) extend the tests in test_widgets.py; the rest are here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
from _widget_helpers import PLUGIN, WAIT, dock, set_tiny, tiny_model

from napari_hdn.session import get_session
from napari_hdn.widgets._base import TaskState

pytestmark = pytest.mark.usefixtures("widget_session")


def wait_idle(qtbot, task, timeout=WAIT):
    qtbot.waitUntil(lambda: not task.running, timeout=timeout)


def _noise_image(shape, seed=0):
    return (100 + 5 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


# -- 1 and 2: result layers say what they are first, and their axes are labelled --------------------


def test_result_layers_say_what_they_are_first_and_label_their_axes(viewer, qtbot, notes):
    stack = _noise_image((3, 72, 64))
    viewer.add_image(stack, name="striped fluorescence")
    entry = get_session().add_model(tiny_model(stack[0]), "tiny", axes="ZYX")
    assert entry.axes == "ZYX"
    pw = dock(viewer, "Predict and explore")
    assert pw.axes_combo.currentText() == "ZYX"  # the model's axes
    pw.n_samples.setValue(2)
    assert pw.run_prediction()
    wait_idle(qtbot, pw.task)
    names = [ly.name for ly in pw.last_layers]
    assert names == ["HDN samples · striped fluorescence", "HDN MMSE · striped fluorescence",
                     "HDN variance · striped fluorescence"]
    # item 1: the layer list shows the start of a name: MMSE and variance differ within 10 characters
    assert len({n[:10] for n in names}) == 3
    meta = viewer.layers["HDN MMSE · striped fluorescence"].metadata["hdn"]
    assert meta["source_layer"] == "striped fluorescence" and meta["model"] == "tiny"
    assert meta["n_samples"] == 2 and meta["levels"] == ["posterior", "posterior"]
    # item 2: axes are labelled, and the sliders say what they move
    smp = viewer.layers["HDN samples · striped fluorescence"]
    assert tuple(smp.axis_labels) == ("sample", "Z", "y", "x")
    assert tuple(viewer.layers["HDN MMSE · striped fluorescence"].axis_labels) == ("Z", "y", "x")
    assert tuple(viewer.dims.axis_labels)[:2] == ("sample", "Z")
    assert notes.errors == []


# -- 4: deleting the image layer while a preview runs ------------------------------------------------


def test_deleting_the_layer_during_a_preview(viewer, qtbot, notes):
    viewer.open_sample(PLUGIN, "calibration-stack")  # another layer the box could jump to
    viewer.open_sample(PLUGIN, "striped-fluorescence")
    layer = viewer.layers["striped fluorescence"]
    get_session().add_model(tiny_model(layer.data[:64, :64]), "tiny")
    aw = dock(viewer, "Artefact removal")
    aw.layer_combo.set_layer("striped fluorescence")
    aw.region.setCurrentText("crop")
    aw.crop_size.setValue(128)
    assert aw.request_preview()
    qtbot.waitUntil(lambda: aw.previews_done == 1, timeout=WAIT)
    assert "HDN preview · striped fluorescence" in viewer.layers
    aw.preview_samples.setValue(64)  # a slower preview, deleted while it runs
    assert aw.request_preview()
    assert aw.preview_task.running
    viewer.layers.remove("striped fluorescence")
    wait_idle(qtbot, aw.preview_task)
    qtbot.waitUntil(lambda: "HDN preview · striped fluorescence" not in viewer.layers, timeout=5000)
    assert "Previewing" not in aw.status.text()
    assert "'striped fluorescence' was removed" in aw.status.text()
    # the box does not jump silently to another layer: it says what happened
    assert aw.layer_combo.current_layer() is None
    assert "'striped fluorescence' was removed" in aw.layer_combo.placeholderText()
    assert not aw.apply_btn.isEnabled() and "choose the image layer" in aw.blocked.text()
    assert aw.previews_done == 1 and notes.errors == []


# -- 5: tiny images get one message with the setting that works --------------------------------------


def test_tiny_image_message_gives_the_setting_that_works(viewer, qtbot, notes):
    from napari_hdn.engine import GaussianNoiseModel

    viewer.add_image(_noise_image((20, 20)), name="tiny")
    get_session().add_noise_model(GaussianNoiseModel(5.0), "g5")
    tw = dock(viewer, "Training")
    set_tiny(tw, steps=2)
    tw.patch.setValue(64)
    assert not tw.start_training()
    msg = notes.errors[-1]
    assert "'tiny' (20x20 pixels) is too small for Patch size 64 with Validation fraction 0.1" in msg
    assert tw.status.text() == msg  # in full in the widget, not only in a notification
    m = re.search(r"set Patch size to (\d+)", msg)
    assert m, msg
    tw.patch.setValue(int(m.group(1)))  # do what it says, with the widget's own controls
    assert tw.patch.value() == int(m.group(1))
    assert tw.start_training(), notes.errors[-1]
    wait_idle(qtbot, tw.task)
    assert tw.state == TaskState.DONE
    assert get_session().models  # a model was trained on the 20x20 image
    # the alternative it names works too
    alt = re.search(r"\(or Patch size (\d+) with Validation fraction 0,", msg)
    assert alt
    tw.patch.setValue(int(alt.group(1)))
    tw.val_fraction.setValue(0.0)
    assert tw.start_training()
    wait_idle(qtbot, tw.task)
    assert tw.state == TaskState.DONE


# -- 6: errors in the widget; Train disabled with the reason before the click -----------------------


def test_errors_show_in_the_widget_and_train_says_why_it_cannot_start(viewer, qtbot, notes,
                                                                       monkeypatch):
    from napari_hdn.engine import GaussianNoiseModel

    tw = dock(viewer, "Training")
    assert not tw.train_btn.isEnabled()
    assert tw.blocked.isVisibleTo(tw) and "choose an image layer" in tw.blocked.text()
    viewer.add_image(_noise_image((64, 64)), name="img")
    assert not tw.train_btn.isEnabled()
    assert "no noise model" in tw.blocked.text() and "no noise model" in tw.train_btn.toolTip()
    # a click is impossible, a call still explains, in the notification and in the widget
    assert not tw.start_training()
    assert "no noise model" in notes.errors[-1]
    assert "no noise model" in tw.status.text() and "color" in tw.status.styleSheet()
    get_session().add_noise_model(GaussianNoiseModel(5.0), "g5")
    assert tw.train_btn.isEnabled() and not tw.blocked.isVisibleTo(tw)
    # a failure in the worker also lands in the status line, in full
    set_tiny(tw, steps=2)
    from napari_hdn.engine import TrainingDivergedError

    def diverging(*a, **k):
        raise TrainingDivergedError("the loss was NaN/inf for 20 batches in a row at step 7; " + 40 * "x")

    monkeypatch.setattr("napari_hdn.widgets.train_widget.Trainer", diverging)
    assert tw.start_training()
    wait_idle(qtbot, tw.task)
    assert tw.state == TaskState.FAILED and tw.train_btn.isEnabled()
    assert tw.status.text() == notes.errors[-1] and tw.status.text().endswith(40 * "x")

    pw = dock(viewer, "Predict and explore")
    assert not pw.run_btn.isEnabled() and "no model" in pw.blocked.text()


# -- 7: closing the viewer during training keeps the checkpoint and says where ----------------------


def test_closing_the_viewer_during_training_keeps_the_checkpoint(make_napari_viewer, qtbot, caplog):
    from napari_hdn.engine import GaussianNoiseModel, load_model

    viewer = make_napari_viewer()
    viewer.add_image(_noise_image((96, 96)), name="img")
    get_session().add_noise_model(GaussianNoiseModel(5.0), "g5")
    tw = dock(viewer, "Training")
    set_tiny(tw, steps=100000)
    assert tw.start_training()
    run = tw._runs[-1]
    qtbot.waitUntil(lambda: run.last_checkpoint.exists(), timeout=WAIT)
    with caplog.at_level(logging.WARNING, logger="napari_hdn"):
        viewer.close()
        qtbot.waitUntil(run.done.is_set, timeout=WAIT)
    assert run.keep
    note = json.loads((run.directory / "interrupted.json").read_text())
    assert note["checkpoint"] == str(run.last_checkpoint) and "'img'" in note["label"]
    assert str(run.directory) in caplog.text  # said where, as it happened
    model = load_model(run.last_checkpoint)
    assert 0 < model.info["steps"] < 100000
    get_session().cleanup()  # what runs at exit: the kept run stays
    assert run.last_checkpoint.exists()
    try:
        tw2 = dock(make_napari_viewer(), "Training")  # and the next Training widget says where
        assert str(run.last_checkpoint) in tw2.status.text() and "interrupted" in tw2.status.text()
    finally:
        shutil.rmtree(run.directory)


def test_a_finished_or_stopped_run_is_not_kept(viewer, qtbot, notes):
    from napari_hdn.engine import GaussianNoiseModel

    viewer.add_image(_noise_image((96, 96)), name="img")
    get_session().add_noise_model(GaussianNoiseModel(5.0), "g5")
    tw = dock(viewer, "Training")
    set_tiny(tw, steps=100000)
    assert tw.start_training()
    run = tw._runs[-1]
    qtbot.waitUntil(lambda: len(tw.plot.train) >= 2, timeout=WAIT)
    tw.stop_btn.click()
    wait_idle(qtbot, tw.task)
    assert tw.state == TaskState.STOPPED and not run.keep
    assert not (run.directory / "interrupted.json").exists()
    get_session().cleanup()
    assert not run.directory.exists()


# -- 10: the cost of a level next to its choice ------------------------------------------------------


def test_level_costs_are_shown_next_to_the_choice(viewer, qtbot, notes):
    from napari_hdn.engine.prediction.levels import mean_log_likelihood as _mean_log_likelihood

    viewer.open_sample(PLUGIN, "striped-fluorescence")
    layer = viewer.layers["striped fluorescence"]
    entry = get_session().add_model(tiny_model(layer.data[:128, :128]), "tiny")
    aw = dock(viewer, "Artefact removal")
    aw.layer_combo.set_layer(layer.name)
    aw.region.setCurrentText("crop")
    aw.crop_size.setValue(96)
    assert aw.request_preview()
    qtbot.waitUntil(lambda: aw.previews_done == 1, timeout=WAIT)
    prev = viewer.layers["HDN preview · striped fluorescence"]
    reference = prev.data.astype(np.float64).copy()
    assert all(lab.text() == "" for lab in aw.cost_labels.values())

    def cost_text(level):
        # the label's cost; switching a level off also starts the levels' verdicts in the
        # background, and whether " · <verdict>" has been appended yet depends on timing
        return aw.cost_labels[level].text().split(" · ")[0]

    aw.set_level_mode(1, "prior-mean")
    assert cost_text(1) == "…"  # until the preview has computed it
    qtbot.waitUntil(lambda: aw.previews_done == 2, timeout=WAIT)
    changed = prev.data.astype(np.float64)
    energy = ((reference - changed) ** 2).sum() / ((reference - reference.mean()) ** 2).sum()
    assert cost_text(1) == f"−{energy:.1%} energy"
    assert 0 < energy < 1 and aw.cost_labels[2].text() == ""
    crop = layer.data[:96, :96]
    dll = (_mean_log_likelihood(entry.model.noise_model, crop, changed)
           - _mean_log_likelihood(entry.model.noise_model, crop, reference))
    assert f"{dll:+.4f} nats/pixel" in aw.cost_labels[1].toolTip()
    assert f"removes {energy:.1%} of the preview's energy" in aw.cost_summary.text()

    # a second level: its own cost (one extra pass), the first one's kept from the cache
    aw.set_level_mode(2, "prior-mean")
    qtbot.waitUntil(lambda: aw.previews_done == 3, timeout=WAIT)
    assert cost_text(1) == f"−{energy:.1%} energy"
    assert cost_text(2).endswith("energy") and cost_text(2) != "…"
    both = prev.data.astype(np.float64)
    total = ((reference - both) ** 2).sum() / ((reference - reference.mean()) ** 2).sum()
    assert f"removes {total:.1%} of the preview's energy" in aw.cost_summary.text()
    qtbot.waitUntil(lambda: not aw.suggest_task.running, timeout=WAIT)  # the verdicts' job ends here
    assert notes.errors == []


# -- 9: the preview window is centred on the view ------------------------------------------------------


@pytest.mark.parametrize("m", [4, 16, 64])
@pytest.mark.parametrize("n", [64, 128, 256])
def test_preview_window_is_centred_and_aligned(m, n):
    from napari_hdn.engine.prediction.level_preview import MIN_PREVIEW_SIDE, centred_region

    H = W = 1000
    for cy, cx in [(300.0, 417.5), (501.0, 333.0), (256.0, 700.25)]:
        y0, x0, h, w = centred_region(H, W, cy, cx, n, n, m)
        assert y0 % m == 0 and x0 % m == 0
        assert abs(y0 + h / 2 - cy) <= 0.5 and abs(x0 + w / 2 - cx) <= 0.5
        assert min(MIN_PREVIEW_SIDE, n) <= h <= max(n, MIN_PREVIEW_SIDE + 2 * m)
    # at the image's edge it cannot be centred: it stays inside the image
    y0, x0, h, w = centred_region(H, W, 5.0, 995.0, n, n, m)
    assert y0 == 0 and h == n and x0 % m == 0 and x0 + w == W


# -- presets come from engine/presets.py only ----------------------------------------------------------


def test_training_widget_takes_the_presets_whole(viewer, monkeypatch):
    """A change of engine/presets.py (architecture, and training settings the form has no field
    for) reaches the widget's preset without being restated there."""
    from napari_hdn.engine.training import presets

    name = presets.DEFAULT_PRESET
    changed = presets.Preset(name, "changed", model=dict(levels=3, z_dim=8, filters=16, blocks=1,
                                                           dropout=0.05),
                             training=dict(patch_size=48, batch_size=4, lr=0.00123, max_steps=77,
                                           lr_patience=7, val_fraction=0.2))
    monkeypatch.setitem(presets.PRESETS, name, changed)
    tw = dock(viewer, "Training")
    assert tw.preset.currentText() == name
    mcfg, tcfg = tw.model_config(), tw.training_config()
    assert (mcfg.levels, mcfg.z_dim, mcfg.filters, mcfg.blocks, mcfg.dropout) == (3, 8, 16, 1, 0.05)
    assert (tcfg.patch_size, tcfg.batch_size, tcfg.lr, tcfg.max_steps) == (48, 4, 0.00123, 77)
    assert tcfg.lr_patience == 7 and tcfg.val_fraction == 0.2  # no field in the form: passed on
    assert [tw.preset.itemText(i) for i in range(tw.preset.count())] == [*presets.PRESETS, "custom"]
    tw.lr.setValue(0.01)  # a field the user edits wins over the preset
    assert tw.training_config().lr == 0.01 and tw.training_config().lr_patience == 7


# -- previews take every core while nothing else runs (issue 10) -----------------------------------


def test_the_forms_offer_what_the_engine_takes(viewer):
    """The spin boxes read the engine's option rules: the noise form offers every mixture size and
    degree a GMM can have, and no form offers a value the engine refuses."""
    from napari_hdn.engine.options import bounds

    nw = dock(viewer, "Noise model")
    assert (nw.n_gaussians.minimum(), nw.n_gaussians.maximum()) == bounds("n_gaussians")
    assert (nw.degree.minimum(), nw.degree.maximum()) == bounds("degree")
    tw = dock(viewer, "Training")
    for box, key in ((tw.patch, "patch_size"), (tw.batch, "batch_size"), (tw.steps, "max_steps")):
        lo, hi = bounds(key)
        assert lo <= box.minimum() and box.maximum() <= hi, key


def test_a_preview_takes_every_core_only_while_no_other_job_runs(qtbot, monkeypatch):
    import threading

    import torch
    from qtpy.QtCore import QObject

    from napari_hdn.engine.threads import default_job_threads
    from napari_hdn.widgets._workers import EngineTask, job_threads

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    torch.set_num_threads(4)  # the widget_session fixture puts it back to 1 for the next test
    owner = QObject()
    long_job, preview = (EngineTask(owner, lambda ev: None, lambda out: None) for _ in range(2))
    assert default_job_threads() == 3
    assert job_threads(interactive=True) == 4 and job_threads() == 3

    release, seen = threading.Event(), {}
    long_job.start(lambda report, flag: release.wait(10))
    try:
        assert long_job.threads == 3
        assert job_threads(interactive=True) == 3  # never more threads than cores in all
        preview.start(lambda report, flag: seen.setdefault("n", torch.get_num_threads()),
                      interactive=True)
        wait_idle(qtbot, preview)
        assert preview.threads == seen["n"] == 3
    finally:
        release.set()
    wait_idle(qtbot, long_job)
    preview.start(lambda report, flag: seen.__setitem__("n", torch.get_num_threads()),
                  interactive=True)
    wait_idle(qtbot, preview)
    assert preview.threads == seen["n"] == 4
    get_session().cpu_threads = 2  # the user's setting (Training > Advanced) wins
    assert job_threads(interactive=True) == job_threads() == 2
    owner.deleteLater()


def test_replacing_a_result_layer_refreshes_only_what_changed(viewer):
    """The artefact preview replaces its layer on every toggle: setting scale, translate or
    visibility to their current values still costs napari a refresh, so they are left alone."""
    from napari_hdn.widgets._layers import add_or_replace_image

    src = viewer.add_image(np.zeros((64, 64), np.float32), name="src", scale=(2.0, 2.0))
    first = add_or_replace_image(viewer, "out", np.ones((32, 32), np.float32), src,
                                 translate=(4.0, 8.0), contrast_limits=(0.0, 1.0))
    fired = []
    for name in ("scale", "translate", "visible", "contrast_limits"):
        getattr(first.events, name).connect(lambda e, name=name: fired.append(name))
    same = add_or_replace_image(viewer, "out", np.full((32, 32), 2, np.float32), src,
                                translate=(4.0, 8.0), contrast_limits=(0.0, 1.0),
                                metadata={"k": 1})
    assert same is first and fired == []
    np.testing.assert_array_equal(first.data, 2)
    assert first.metadata == {"k": 1}
    add_or_replace_image(viewer, "out", first.data, src, translate=(6.0, 8.0),
                         contrast_limits=(0.0, 3.0))
    assert sorted(set(fired)) == ["contrast_limits", "translate"]
    np.testing.assert_allclose(first.translate, (6.0, 8.0))
    np.testing.assert_allclose(first.scale, (2.0, 2.0))
