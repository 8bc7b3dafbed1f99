"""Predict and explore: posterior samples, MMSE and variance of an image layer, as layers."""

from __future__ import annotations

import time
from pathlib import Path

from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ..engine import InputError, load_model, predict, resolve_device
from ..session import get_session
from ._common import (
    MAX_SEED,
    AxesChooser,
    LayerChooser,
    SessionChooser,
    TaskState,
    add_or_replace_image,
    check_image_layer,
    combo,
    form,
    input_limits,
    notify_error,
    notify_info,
    notify_warning,
    output_name,
    run_guarded,
    scroll_body,
    spin,
    status_label,
)
from ._workers import EngineTask, Outcome, user_message
from .train_widget import device_items

#: Keep the samples layer only up to this many bytes (samples x image); above it, ask for fewer.
SAMPLES_LAYER_LIMIT = 2 << 30


def load_model_into_session(path, parent=None):
    """Load a .hdn file (asking for one when ``path`` is None) and register it in the session."""
    if path is None:
        path, _ = QFileDialog.getOpenFileName(parent, "Load HDN model", "",
                                              "HDN model (*.hdn);;All files (*)")
        if not path:
            return None
    model = run_guarded("Load model", load_model, path)
    if model is None:
        return None
    return get_session().add_model(model, Path(path).stem, f"file {path}", path=path)


def check_model_fits(model, arr, name: str) -> None:
    """Prediction pads to multiples of 2**L; refuse only images smaller than one top-level pixel."""
    m = model.config.downscale
    h, w = arr.shape[-2:]
    if min(h, w) < 2:
        raise InputError(f"'{name}' is only {h}x{w} pixels: nothing to restore")
    if max(h, w) < m // 2:
        raise InputError(
            f"'{name}' ({h}x{w}) is much smaller than the model's top level ({m}x{m} pixels, "
            f"{model.levels} levels): use a larger image or a model with fewer levels"
        )


class PredictWidget(QWidget):
    """Restore an image layer with a trained HDN: samples, MMSE and variance layers.

    State flow: a model from the session (just trained, or loaded from a file) and an image layer
    -> :func:`napari_hdn.engine.predict` in a worker thread (progress per sample batch, Stop) -> on
    return the layers "<layer> HDN MMSE", "<layer> HDN variance" and "<layer> HDN samples" are
    added, or their data replaced when they already exist.
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session()
        self.state = TaskState.IDLE
        self.task = EngineTask(self, self._on_events, self._on_finished)
        self.last_layers: list = []

        lay = scroll_body(self)
        box = QGroupBox("Input")
        f = form()
        row = QHBoxLayout()
        self.model_combo = SessionChooser("models")
        self.model_load = QPushButton("Load…")
        self.model_load.setToolTip("Load a model file (.hdn); File > Open does the same")
        row.addWidget(self.model_combo)
        row.addWidget(self.model_load)
        self.model_info = status_label()
        self.layer_combo = LayerChooser(napari_viewer)
        self.axes_combo = AxesChooser(self.layer_combo)
        f.addRow("Model", row)
        f.addRow("", self.model_info)
        f.addRow("Image layer", self.layer_combo)
        f.addRow("Axes", self.axes_combo)
        box.setLayout(f)
        lay.addWidget(box)

        box = QGroupBox("Sampling")
        f = form()
        self.n_samples = spin(1, 10000, 100, 10, "Posterior samples per image; the MMSE is their mean "
                              "(paper: 100)")
        self.keep_samples = QCheckBox("Samples layer")
        self.keep_samples.setToolTip("Also add all samples as one layer with a slider over samples")
        self.keep_samples.setChecked(True)
        self.tile = spin(0, 8192, 0, 64, "Tile size in pixels for large images (auto: untiled up "
                         "to 1024x1024, else 512)", special="auto")
        self.seed = spin(0, MAX_SEED, 0, 1, "Same seed, same samples")
        self.device = combo()
        for label, name in device_items():
            self.device.addItem(label, name)
        f.addRow("Samples", self.n_samples)
        f.addRow("", self.keep_samples)
        f.addRow("Tile size", self.tile)
        f.addRow("Seed", self.seed)
        f.addRow("Device", self.device)
        box.setLayout(f)
        lay.addWidget(box)

        row = QHBoxLayout()
        self.run_btn = QPushButton("Predict")
        self.stop_btn = QPushButton("Stop")
        row.addWidget(self.run_btn)
        row.addWidget(self.stop_btn)
        lay.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m samples")
        lay.addWidget(self.progress)
        self.status = status_label("Choose a model and an image layer, then Predict.")
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.run_btn.clicked.connect(self.run_prediction)
        self.stop_btn.clicked.connect(self.stop)
        self.model_load.clicked.connect(lambda: load_model_into_session(None, self))
        self.model_combo.currentIndexChanged.connect(self._show_model_info)
        self._show_model_info()
        self._set_state(TaskState.IDLE)

    def _show_model_info(self, *_) -> None:
        e = self.model_combo.current_entry()
        if e is None:
            self.model_info.setText("No model yet: train one (Training widget) or load a .hdn file.")
        else:
            c = e.model.config
            self.model_info.setText(f"{c.levels} levels, {c.filters} filters, {e.steps} steps; {e.source}")

    # -- actions ------------------------------------------------------------------------------------
    def run_prediction(self) -> bool:
        if self.task.running:
            notify_warning("A prediction is already running.")
            return False
        prep = run_guarded("Prediction", self._prepare)
        if prep is None:
            return False
        job, meta = prep
        self._meta = meta
        self._t0 = time.perf_counter()
        self.progress.setRange(0, meta["total"])
        self.progress.setValue(0)
        self.status.setText("Computing…")
        self._set_state(TaskState.RUNNING)
        self.task.start(job, name="napari-hdn prediction")
        return True

    def _prepare(self):
        entry = self.model_combo.current_entry()
        if entry is None:
            raise InputError("no model: train one in the Training widget or load a .hdn file (Load…)")
        layer = self.layer_combo.current_layer()
        arr = check_image_layer(layer, "image")
        axes = self.axes_combo.axes_for(arr)
        device = self.device.currentData()
        resolve_device(device)
        check_model_fits(entry.model, arr, layer.name)
        n = self.n_samples.value()
        keep = self.keep_samples.isChecked()
        if keep and n * arr.size * 4 > SAMPLES_LAYER_LIMIT:
            raise InputError(
                f"keeping {n} samples of '{layer.name}' would take {n * arr.size * 4 / 2**30:.1f} GiB: "
                "untick 'Add a samples layer' or use fewer samples"
            )
        tile = self.tile.value() or None
        seed = self.seed.value()
        model = entry.model

        def job(report, stop):
            return predict(model, arr, n_samples=n, axes=axes, tile_size=tile, seed=seed,
                           return_samples=keep, device=device, callbacks=report, stop_flag=stop)

        frames = arr.size // (arr.shape[-1] * arr.shape[-2])
        meta = {"layer": layer.name, "model": entry.name, "axes": axes, "n": n, "seed": seed,
                "total": n * frames}
        return job, meta

    def stop(self) -> None:
        if self.task.running:
            self.task.stop()
            self._set_state(TaskState.STOPPING)

    # -- worker events (GUI thread) ----------------------------------------------------------------
    def _on_events(self, events) -> None:
        for ev in events:
            if ev.task == "predict" and ev.kind in ("start", "step"):
                if ev.kind == "start":
                    self.progress.setRange(0, max(1, ev.total))
                self.progress.setValue(ev.step)
        # the engine counts samples over all tiles; show images-worth of samples
        self.status.setText(f"Sampling… {self.progress.value()} / {self.progress.maximum()}")

    def _on_finished(self, out: Outcome) -> None:
        meta = self._meta
        if out.stopped and out.ok:
            self._set_state(TaskState.STOPPED)
            self.status.setText("Stopped: no layers were changed.")
            notify_info("Prediction stopped; no layers were changed.")
            return
        if not out.ok:
            msg, _ = user_message(out.error, "Prediction")
            notify_error(msg)
            self.status.setText(msg)
            self._set_state(TaskState.FAILED)
            return
        res = out.value
        if meta["layer"] not in self.viewer.layers:
            notify_warning(f"Layer '{meta['layer']}' was removed while predicting; results not added.")
            self._set_state(TaskState.FAILED)
            return
        layer = self.viewer.layers[meta["layer"]]
        self.last_layers = add_result_layers(self.viewer, layer, res, meta["model"], meta["axes"],
                                             suffix="", extra={})
        self._set_state(TaskState.DONE)
        el = time.perf_counter() - self._t0
        self.status.setText(
            f"Done in {el:.1f} s: {', '.join(ly.name for ly in self.last_layers)}."
        )

    # -- state --------------------------------------------------------------------------------------
    def _set_state(self, state: TaskState) -> None:
        self.state = state
        busy = state in (TaskState.RUNNING, TaskState.STOPPING)
        self.run_btn.setEnabled(not busy)
        self.stop_btn.setEnabled(state == TaskState.RUNNING)
        self.model_load.setEnabled(not busy)


def add_result_layers(viewer, layer, res, model_name: str, axes: str, suffix: str, extra: dict):
    """Add (or replace) the MMSE, variance and, when present, samples layers of a prediction."""
    base = layer.name
    meta = {"hdn": {"source_layer": base, "model": model_name, "axes": axes,
                    "n_samples": res.n_samples, "seed": res.seed, "levels": list(res.levels),
                    "tiles": res.info.get("tiles"), **extra}}
    lims = input_limits(layer, res.mmse)
    out = [
        add_or_replace_image(viewer, output_name(base, "MMSE", suffix), res.mmse, layer,
                             metadata={**meta, "hdn": {**meta["hdn"], "output": "mmse"}},
                             contrast_limits=lims),
        add_or_replace_image(viewer, output_name(base, "variance", suffix), res.variance, layer,
                             metadata={**meta, "hdn": {**meta["hdn"], "output": "variance"}},
                             colormap="magma", visible=False),
    ]
    if res.samples is not None:
        out.insert(0, add_or_replace_image(
            viewer, output_name(base, "samples", suffix), res.samples, layer, leading=1,
            metadata={**meta, "hdn": {**meta["hdn"], "output": "samples"}}, contrast_limits=lims,
            visible=False))
    # keep the MMSE on top and selected: it is what one looks at first
    mm = out[-2]
    viewer.layers.selection.active = mm
    return out
