"""Predict and explore: posterior samples, MMSE and variance of an image layer, as layers."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from qtpy.QtWidgets import QCheckBox, QGroupBox, QHBoxLayout, QPushButton

from ..engine import InputError, predict_in_rounds, resolve_device
from ..engine.channels import MultiChannelModel, check_channels, layout_of
from ._base import EngineWidget, TaskState
from ._forms import MAX_SEED, MODEL_FILTER, ask_open, form, notify_info, scroll_body, spin, status_label
from ._inputs import (
    NO_MODEL,
    AxesChooser,
    LayerChooser,
    SessionChooser,
    check_model_fits,
    chosen_model_and_image,
    device_chooser,
    lazy_layer_data,
)
from ._layers import add_result_layers

#: Keep the samples layer only up to this many bytes (samples x image); above it, ask for fewer.
SAMPLES_LAYER_LIMIT = 2 << 30


class PredictWidget(EngineWidget):
    """Restore an image layer with a trained HDN: samples, MMSE and variance layers.

    State flow: a model from the session (just trained, or loaded from a file) and an image layer
    -> :func:`napari_hdn.engine.predict_in_rounds` in a worker thread (progress per sample batch,
    Stop) -> on return the layers "HDN MMSE · <layer>", "HDN variance · <layer>" and "HDN samples ·
    <layer>" are added, or their data replaced when they already exist. A stopped prediction keeps
    the samples of the rounds it finished, in layers named with their count.
    """

    what = "Prediction"
    stopping_text = "Stopping: the samples drawn so far are kept…"

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(napari_viewer, parent)
        self.last_layers: list = []

        lay = scroll_body(self)
        box = QGroupBox("Input")
        self.model_combo = SessionChooser("models")
        self.model_load = QPushButton("Load…")
        self.model_load.setToolTip("Load a model file (.hdn); File > Open does the same")
        row = QHBoxLayout()
        row.addWidget(self.model_combo)
        row.addWidget(self.model_load)
        self.model_info = status_label()
        self.layer_combo = LayerChooser(napari_viewer)
        self.axes_combo = AxesChooser(self.layer_combo)
        f = form()
        f.addRow("Model", row)
        f.addRow("", self.model_info)
        f.addRow("Image layer", self.layer_combo)
        f.addRow("Axes", self.axes_combo)
        box.setLayout(f)
        lay.addWidget(box)

        box = QGroupBox("Sampling")
        self.n_samples = spin(1, 10000, 100, 10, "Posterior samples per image; the MMSE is their mean "
                              "(paper: 100)")
        self.keep_samples = QCheckBox("Samples layer")
        self.keep_samples.setToolTip("Also add all samples as one layer with a slider over samples")
        self.keep_samples.setChecked(True)
        self.tile = spin(0, 8192, 0, 64, "Tile size in pixels for large images (auto: untiled up "
                         "to 1024x1024, else 512)", special="auto")
        self.seed = spin(0, MAX_SEED, 0, 1, "Same seed, same samples")
        self.device = device_chooser()
        box.setLayout(form([("Samples", self.n_samples), ("", self.keep_samples),
                            ("Tile size", self.tile), ("Seed", self.seed), ("Device", self.device)]))
        lay.addWidget(box)

        self.add_run_row(lay, "Predict", progress_format="%v / %m samples",
                         idle_text="Choose a model and an image layer, then Predict.",
                         stop_tip="Stops after the current round; the samples drawn so far are kept")
        lay.addStretch(1)

        self.model_load.clicked.connect(lambda: self.load_model())
        self.model_combo.currentIndexChanged.connect(self._on_model)
        self.layer_combo.currentIndexChanged.connect(self.update_controls)
        self._on_model()
        self.set_state(TaskState.IDLE)

    def _on_model(self, *_) -> None:
        e = self.model_combo.current_entry()
        if e is None:
            self.model_info.setText("No model yet: train one (Training widget) or load a .hdn file.")
        else:
            c = e.model.config
            ch = f"{e.model.channels} channels (one HDN each), " if isinstance(
                e.model, MultiChannelModel) else ""
            self.model_info.setText(f"{ch}{c.levels} levels, {c.filters} filters, {e.steps} "
                                    f"steps; {e.source}")
            self.axes_combo.prefer(e.axes)  # the axes it was trained on, when the layer has them
        self.update_controls()

    def load_model(self, path=None):
        """Load a .hdn file (asking for one when ``path`` is None) into the session."""
        path = ask_open(self, "Load HDN model", MODEL_FILTER, path)
        return None if path is None else self.guard("Load model", self.session.open_model_file, path)

    # -- job ----------------------------------------------------------------------------------------
    def blocker(self) -> str:
        if self.model_combo.current_entry() is None:
            return NO_MODEL
        if self.layer_combo.current_layer() is None:
            return "choose the image layer to restore"
        return ""

    def run_prediction(self) -> bool:
        return self.start()

    def prepare(self):
        layer = self.layer_combo.current_layer()
        lazy = lazy_layer_data(layer)
        entry = self.model_combo.current_entry()
        if lazy is not None and not isinstance(getattr(entry, "model", None), MultiChannelModel):
            return self._prepare_lazy(layer, lazy)
        entry, layer, arr = chosen_model_and_image(self.model_combo, self.layer_combo,
                                                   channels=True)
        axes = self.axes_combo.axes_for(arr)
        check_channels(entry.model, layout_of(arr.shape, axes, f"'{layer.name}'"),
                       f"'{layer.name}'")
        device = self.device.currentData()
        resolve_device(device)
        check_model_fits(entry.model, arr, layer.name, axes)
        n = self.n_samples.value()
        keep = self.keep_samples.isChecked()
        if keep and n * arr.size * 4 > SAMPLES_LAYER_LIMIT:
            raise InputError(
                f"keeping {n} samples of '{layer.name}' would take {n * arr.size * 4 / 2**30:.1f} GiB: "
                "untick 'Samples layer' or use fewer samples"
            )
        tile = self.tile.value() or None
        seed = self.seed.value()
        model = entry.model

        def job(report, stop):
            return predict_in_rounds(model, arr, n_samples=n, axes=axes, tile_size=tile, seed=seed,
                                     return_samples=keep, device=device, callbacks=report,
                                     stop_flag=stop)

        return job, {"layer": layer.name, "model": entry.name, "axes": axes, "n": n, "seed": seed,
                     "total": n}

    def _prepare_lazy(self, layer, data):
        """A dask- or zarr-backed layer (e.g. an OME-Zarr): predicted chunk by chunk into a zarr
        store in the temporary folder, never loaded whole; the results are opened lazily."""
        from ..engine.largedata import model_fingerprint, predict_to_zarr

        entry = self.model_combo.current_entry()
        if entry is None:
            raise InputError(NO_MODEL)
        axes = self.axes_combo.axes_for(data)
        device = self.device.currentData()
        resolve_device(device)
        check_model_fits(entry.model, data, layer.name)
        n, seed, tile = self.n_samples.value(), self.seed.value(), self.tile.value() or None
        model = entry.model
        key = hashlib.sha1(repr((layer.name, tuple(data.shape), axes, n, seed, tile,
                                 model_fingerprint(model))).encode()).hexdigest()[:10]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in layer.name)[:40]
        store = Path(tempfile.gettempdir()) / "napari-hdn-predictions" / f"{safe}-{key}.zarr"

        def job(report, stop):
            return predict_to_zarr(model, data, store, n, axes=axes, tile_size=tile, seed=seed,
                                   device=device, callbacks=report, stop_flag=stop)

        return job, {"layer": layer.name, "model": entry.name, "axes": axes, "n": n, "seed": seed,
                     "total": 0, "lazy": True, "store": str(store)}

    def on_start(self, meta: dict) -> None:
        super().on_start(meta)
        self.show_status("Computing…")

    def on_events(self, events) -> None:
        super().on_events(events)
        unit = "chunks" if self.meta.get("lazy") else ""
        self.show_status(f"Sampling… {self.progress.value()} / {self.progress.maximum()} {unit}")

    def on_result(self, out) -> TaskState:
        meta = self.meta
        if out.value is None:  # stopped before the first round finished
            self.show_status("Stopped before any sample was finished: no layers were changed.")
            notify_info("Prediction stopped; no layers were changed.")
            return TaskState.STOPPED
        res = out.value
        if meta["layer"] not in self.viewer.layers:
            self.show_error(f"Prediction: layer '{meta['layer']}' was removed while predicting; "
                            "results not added.")
            return TaskState.FAILED
        layer = self.viewer.layers[meta["layer"]]
        if meta.get("lazy"):
            return self._lazy_result(layer, res)
        self.last_layers = add_result_layers(self.viewer, layer, res, meta["model"], meta["axes"])
        names = ", ".join(ly.name for ly in self.last_layers)
        if res.info.get("stopped"):
            text = (f"Stopped after {res.n_samples} of {meta['n']} samples: their MMSE and "
                    f"variance are in {names}.")
            self.show_status(text)
            notify_info(f"Prediction stopped; kept the {res.n_samples} samples drawn.")
            return TaskState.STOPPED
        self.show_status(f"Done in {self.elapsed():.1f} s: {names}.")
        return TaskState.DONE

    def _lazy_result(self, layer, res) -> TaskState:
        info = res.info
        if info["stopped"]:
            self.show_status(f"Stopped: {info['chunks_done']} of {info['chunks']} chunks are in "
                             f"{info['store']}; Predict again (same settings) computes the others.")
            notify_info("Prediction stopped; the chunks written are kept.")
            return TaskState.STOPPED
        self.last_layers = add_result_layers(self.viewer, layer, res, self.meta["model"],
                                             self.meta["axes"], extra={"store": info["store"]})
        self.show_status(f"Done in {self.elapsed():.1f} s: {info['chunks_run']} of {info['chunks']} "
                         f"chunks computed; results read lazily from {info['store']}.")
        return TaskState.DONE

    def update_controls(self, *_) -> None:
        super().update_controls()
        self.model_load.setEnabled(not self.busy)
