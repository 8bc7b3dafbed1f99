"""Predict widget on a stack with "auto" samples: finished frames appear as they finish, the status
says samples per frame and time left, a stop keeps the finished frames, and the Qt event loop is
never blocked for long."""

from __future__ import annotations

import time

import numpy as np
import pytest
from _widget_helpers import WAIT, dock, tiny_model

from napari_hdn.widgets import get_session
from napari_hdn.widgets._base import TaskState

pytestmark = pytest.mark.usefixtures("widget_session")


def _stack(n=12, side=64):
    rng = np.random.default_rng(0)
    return rng.normal(50, 5, (n, side, side)).astype(np.float32)


def _predict_widget(viewer, stack):
    viewer.add_image(stack, name="stack")
    get_session().add_model(tiny_model(stack[0]), "tiny")
    pw = dock(viewer, "Predict and explore")
    pw.layer_combo.set_layer("stack")
    pw.axes_combo.setCurrentText("ZYX")
    assert pw.n_samples.value() == 0 and pw.n_samples.text() == "auto"  # the default
    return pw


def test_auto_prediction_shows_frames_as_they_finish(viewer, qtbot, notes):
    pw = _predict_widget(viewer, _stack())
    seen, texts = [], []

    selected = []

    def watch():
        name = "HDN MMSE · stack · in progress"
        if name in viewer.layers:
            seen.append(int((np.abs(viewer.layers[name].data).sum((1, 2)) > 0).sum()))
            selected.append(viewer.layers.selection.active.name)
        texts.append(pw.status.text())

    from qtpy.QtCore import QTimer

    t = QTimer()
    t.timeout.connect(watch)
    t.start(20)
    assert pw.run_prediction()
    qtbot.waitUntil(lambda: not pw.task.running, timeout=WAIT)
    t.stop()
    assert pw.state == TaskState.DONE, notes.errors
    assert any(0 < v < 12 for v in seen), seen  # partial results were on screen
    assert "HDN MMSE · stack · in progress" not in viewer.layers  # replaced by the final layers
    # the live layers leave the user's selection alone; the finished MMSE is selected
    assert set(selected) == {"stack"}, set(selected)
    mmse = viewer.layers["HDN MMSE · stack"]
    qtbot.waitUntil(lambda: viewer.layers.selection.active is mmse, timeout=2000)
    assert mmse.data.shape == (12, 64, 64)
    assert viewer.layers["HDN samples · stack"].data.shape == (8, 12, 64, 64)
    counts = mmse.metadata["hdn"]["samples_per_frame"]
    assert len(counts) == 12 and min(counts) >= 8
    assert any("samples per frame" in x and "left" in x for x in texts), texts[-5:]
    assert "samples per frame" in pw.status.text()
    assert pw.progress.value() == pw.progress.maximum() == 12
    assert notes.errors == []


def test_stopping_keeps_the_finished_frames(viewer, qtbot, notes):
    pw = _predict_widget(viewer, _stack(40, 96))
    pw.keep_samples.setChecked(False)
    assert pw.run_prediction()
    qtbot.waitUntil(lambda: pw.progress.value() >= 2, timeout=WAIT)
    pw.stop()
    qtbot.waitUntil(lambda: not pw.task.running, timeout=WAIT)
    assert pw.state == TaskState.STOPPED, notes.errors
    names = [ly.name for ly in viewer.layers if ly.name.startswith("HDN MMSE")]
    assert len(names) == 1 and "frames" in names[0], names
    layer = viewer.layers[names[0]]
    k = layer.data.shape[0]
    assert 2 <= k < 40 and layer.data.shape[1:] == (96, 96)
    assert f"{k} of 40 frames" in names[0]
    assert np.isfinite(layer.data).all() and (np.abs(layer.data).sum((1, 2)) > 0).all()
    assert "HDN MMSE · stack" not in viewer.layers  # no finished-looking layer of a partial run
    assert not any("in progress" in ly.name for ly in viewer.layers)
    assert "Stopped" in pw.status.text() and "frames finished" in pw.status.text()


def test_the_event_loop_is_never_blocked_for_long(viewer, qtbot, notes):
    """A timer ticking every 10 ms while a stack is predicted: no gap between ticks above 100 ms
    (from the click to the final layers, the results included). Without the samples layer: a
    4D layer's first appearance (a new slider) costs napari itself 100-125 ms on a 2-core CPU
    under Xvfb, the 3D layers 60-70 ms each.

    Adding one layer is napari's own cost and the most the widget does in one turn; on a loaded
    machine (another test process on the other core) that alone can pass 100 ms and it varies by
    1.5x from one add to the next (58-103 ms measured alone), so the bound is 100 ms or two plain
    layer adds (with their repaint) timed here, whichever is larger: the freezes of 0.6-0.7 s that
    issue 31 measured fail it, napari's own variance does not. The strict figure, alone,
    on the 60-frame nuclei stack: ``python -m benchmarks.stack_predict --widget``."""
    from qtpy.QtCore import QTimer

    pw = _predict_widget(viewer, _stack(16, 128))
    pw.keep_samples.setChecked(False)
    qtbot.wait(50)
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    viewer.add_image(_stack(16, 128), name="plain", visible=True)
    QApplication.processEvents()  # and the repaint it causes
    one_add = time.perf_counter() - t0
    limit = max(0.1, 2 * one_add)
    ticks = []
    t = QTimer()
    t.timeout.connect(lambda: ticks.append(time.perf_counter()))
    t.start(10)
    qtbot.wait(50)
    assert pw.run_prediction()
    qtbot.waitUntil(lambda: not pw.task.running, timeout=WAIT)
    qtbot.wait(50)
    t.stop()
    assert pw.state == TaskState.DONE, notes.errors
    gaps = np.diff(ticks)
    assert len(gaps) > 10
    assert gaps.max() < limit, (f"the event loop was blocked for {gaps.max() * 1000:.0f} ms "
                                f"(one plain layer add: {one_add * 1000:.0f} ms)")
