"""Predict and explore: posterior samples, MMSE and variance of an image layer, as layers."""

from __future__ import annotations

import gc
import hashlib
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QGroupBox, QHBoxLayout, QPushButton

from ..engine import EventKind, EventTask, InputError, ProgressEvent, predict_in_rounds, resolve_device
from ..engine.data.layout import layout_of
from ..engine.network.multichannel import MultiChannelModel, check_channels
from ..engine.prediction.sampling import AUTO_SAMPLES, DEFAULT_SAMPLING, _auto_floor
from ..session import Registry
from ._base import EngineWidget, TaskState
from ._forms import (
    MAX_SEED,
    MODEL_FILTER,
    ask_open,
    ask_save,
    form,
    notify_info,
    rule_range,
    scroll_body,
    spin,
    status_label,
)
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
from ._layers import (
    SAMPLE_AXIS,
    add_or_replace_image,
    add_result_layers,
    axis_labels,
    input_limits,
    keep_selection,
    output_name,
    result_settings,
)

#: Keep the samples layer only up to this many bytes (samples x image); above it, ask for fewer.
SAMPLES_LAYER_LIMIT = 2 << 30


class PredictWidget(EngineWidget):
    """Restore an image layer with a trained HDN: samples, MMSE and variance layers.

    State flow: a model from the session (just trained, or loaded from a file) and an image layer
    -> :func:`napari_hdn.engine.predict_in_rounds` in a worker thread (Stop) -> on return the
    layers "HDN MMSE · <layer>", "HDN variance · <layer>" and "HDN samples · <layer>" are added,
    or their data replaced when they already exist.

    With "auto" samples (the default) frames are sampled one after another until each MMSE is good
    enough; the finished frames appear at once in "HDN MMSE · <layer> · in progress" (and its
    variance), the status says frames done, samples per frame and the time left, and a stop keeps
    the finished frames, in layers named with their count. With a fixed number of samples, a stop
    keeps the samples of the rounds finished, in layers named with their count.
    """

    what = "Prediction"
    stopping_text = "Stopping: the samples drawn so far are kept…"

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(napari_viewer, parent)
        self.last_layers: list = []

        lay = scroll_body(self)
        box = QGroupBox("Input")
        self.model_combo = SessionChooser(Registry.MODELS)
        self.model_load = QPushButton("Load…")
        self.model_load.setToolTip("Load a model file (.hdn); File > Open does the same")
        self.export_btn = QPushButton("Export BMZ…")
        self.export_btn.setToolTip(
            "Share the model: write it as a BioImage Model Zoo package (.zip) that bioimageio.core, "
            "deepImageJ, ilastik and the napari BMZ plugins can run. Its test input is a crop of "
            "the chosen image layer's first frame; bioimageio.core tests the package before it is "
            "written (tens of seconds). Needs napari-hdn[bmz].")
        row = QHBoxLayout()
        row.addWidget(self.model_combo)
        row.addWidget(self.model_load)
        row.addWidget(self.export_btn)
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
        self.n_samples = spin(*rule_range("n_samples", special=True, most=10000), 0, 10,
                              "Posterior samples per frame; the MMSE is their mean. "
                              "auto: until the MMSE is within 0.05 dB of what 100 independent "
                              "samples (the paper's count) give, 8 to 100 per frame; a number "
                              "forces that many", special="auto")
        self.keep_samples = QCheckBox("Samples layer")
        self.keep_samples.setToolTip("Also add all samples as one layer with a slider over samples")
        self.keep_samples.setChecked(True)
        self.tile = spin(*rule_range("tile_size", special=True, most=8192), 0, 64,
                         "Tile size in pixels for large images (auto: untiled up "
                         "to 1024x1024, else 512)", special="auto")
        self.seed = spin(*rule_range("seed", most=MAX_SEED), 0, 1, "Same seed, same samples")
        self.device = device_chooser()
        box.setLayout(form([("Samples", self.n_samples), ("", self.keep_samples),
                            ("Tile size", self.tile), ("Seed", self.seed), ("Device", self.device)]))
        lay.addWidget(box)

        self.add_run_row(lay, "Predict", progress_format="%v / %m samples",
                         idle_text="Choose a model and an image layer, then Predict.",
                         stop_tip="Stops within a sample batch; the frames finished (auto) or "
                         "the samples of the rounds finished (a fixed number) are kept")
        self._live: dict = {}
        lay.addStretch(1)

        self.model_load.clicked.connect(lambda: self.load_model())
        self.export_btn.clicked.connect(lambda: self.export_bmz())
        self.add_task("Export", self._prepare_export, self._exported)
        self._export_to: Path | None = None
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

    # -- sharing -------------------------------------------------------------------------------------
    def export_bmz(self, path=None) -> bool:
        """Export the chosen model as a BioImage Model Zoo package to ``path`` (asked for when
        None), tested by bioimageio.core, in the background; True when the export started."""
        self._export_to = None if path is None else Path(path)
        return self.start_task("Export")

    def _prepare_export(self):
        from ..engine.bmz import export_bmz

        entry = self.model_combo.current_entry()
        if entry is None:
            raise InputError(NO_MODEL)
        if isinstance(entry.model, MultiChannelModel):
            raise InputError("a BioImage Model Zoo package holds one HDN: this model has one per "
                             "channel; export each channel's model from the command line")
        layer = self.layer_combo.current_layer()
        if layer is None:
            raise InputError("choose an image layer like the training data: a crop of its first "
                             "frame is the package's test input")
        data = layer.data
        axes = self.axes_combo.axes_for(data)
        lead = len(axes) - 2 if axes and axes.endswith("YX") else 0
        frame = np.asarray(data[(0,) * lead]) if lead else np.asarray(data)  # one frame is read
        path = self._export_to or ask_save(self, "Export to BioImage Model Zoo",
                                           f"{entry.name.split(' ')[0]}.zip",
                                           "BioImage Model Zoo package (*.zip)", ".zip")
        if path is None:
            return None
        model, source = entry.model, entry.path

        def job(report, stop):
            return export_bmz(model, path, frame, axes="YX" if lead or frame.ndim == 2 else axes,
                              overwrite=True, source_path=source)

        return job, {"path": path}

    def _exported(self, out, meta) -> None:
        rep = out.value
        if rep is None:
            return
        notify_info(f"Exported {rep.path.name}: bioimageio.core's test {rep.status}, "
                    f"{rep.size_bytes / 1e6:.1f} MB, in {rep.seconds:.0f} s")
        self.show_status("; ".join(rep.lines()))

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
        n = self.n_samples.value() or "auto"
        keep = self.keep_samples.isChecked()
        kept = n if n != "auto" else _auto_floor(AUTO_SAMPLES, DEFAULT_SAMPLING)
        if keep and kept * arr.size * 4 > SAMPLES_LAYER_LIMIT:
            raise InputError(
                f"keeping {kept} samples of '{layer.name}' would take "
                f"{kept * arr.size * 4 / 2**30:.1f} GiB: "
                "untick 'Samples layer' or use fewer samples"
            )
        tile = self.tile.value() or None
        seed = self.seed.value()
        model = entry.model

        live = n == "auto" and not isinstance(model, MultiChannelModel)
        extra = {}
        if live:
            shape = arr.shape

            def on_frames(first, stop, mmse, variance, counts, samples):
                # finished frames go to the GUI thread with the progress events (copies: the
                # engine's arrays are its own)
                extra["report"](ProgressEvent(EventTask.PREDICT, EventKind.FRAMES, step=stop, metrics={
                    "first": first, "mmse": np.array(mmse), "variance": np.array(variance),
                    "samples": None if samples is None else np.array(samples),
                    "shape": shape}))

            extra["on_frames"] = on_frames

        ready = threading.Event()

        def job(report, stop):
            kw = {}
            if live:
                extra["report"] = report
                kw["on_frames"] = extra["on_frames"]
                # the GUI adds the live layers first, one per event-loop turn, with no worker
                # competing for the GIL (see _add_next_live)
                t_end = time.monotonic() + 10.0
                while not ready.wait(0.05) and time.monotonic() < t_end:
                    stop.check()
            return predict_in_rounds(model, arr, n_samples=n, axes=axes, tile_size=tile, seed=seed,
                                     return_samples=keep, device=device, callbacks=report,
                                     stop_flag=stop, **kw)

        return job, {"layer": layer.name, "model": entry.name, "axes": axes, "n": n, "seed": seed,
                     "total": 0 if n == "auto" else n, "live": live, "keep": keep,
                     "ready": ready, "shape": tuple(arr.shape), "kept": kept}

    def _prepare_lazy(self, layer, data):
        """A dask- or zarr-backed layer (e.g. an OME-Zarr): predicted chunk by chunk into a zarr
        store in the temporary folder, never loaded whole; the results are opened lazily."""
        from ..engine.prediction.chunked import model_fingerprint, predict_to_zarr

        entry = self.model_combo.current_entry()
        if entry is None:
            raise InputError(NO_MODEL)
        axes = self.axes_combo.axes_for(data)
        device = self.device.currentData()
        resolve_device(device)
        check_model_fits(entry.model, data, layer.name)
        n, seed, tile = self.n_samples.value() or "auto", self.seed.value(), self.tile.value() or None
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
        gc_freeze()
        self._live = {}
        if meta.get("live"):
            self._start_live(meta)
        auto = meta.get("n") == "auto" and not meta.get("lazy")
        self.progress.setFormat("%v / %m frames" if auto else "%v / %m samples")
        self.show_status("Computing…")

    def on_events(self, events) -> None:
        frames = [ev for ev in events if ev.kind == EventKind.FRAMES]
        super().on_events([ev for ev in events if ev.kind != EventKind.FRAMES])
        if frames:
            self._show_frames(frames)
        if self.meta.get("lazy"):
            self.show_status(f"Sampling… {self.progress.value()} / {self.progress.maximum()} chunks")
            return
        last = next((ev for ev in reversed(events) if ev.kind in (EventKind.START, EventKind.STEP)), None)
        if last is not None:
            self.show_status(progress_text(last.metrics or {}, self.progress.value(),
                                           self.progress.maximum()))

    # -- results as frames finish (auto samples) -------------------------------------------------
    # Layers are the costly part of the GUI's work: adding one takes ~95 ms and removing one
    # ~220 ms on a 2-core CPU under Xvfb (napari runs a full garbage collection on every removal).
    # So the "in progress" layers are added one per event-loop turn as frames arrive, become the
    # result layers by being renamed (no removal), and the result replaces their data.

    LIVE = (("mmse", "MMSE"), ("variance", "variance"), ("samples", "samples"))

    def _start_live(self, meta: dict) -> None:
        """The arrays of the live layers (zeros until frames finish); the layers are added one
        per event-loop turn, and the job starts sampling once they are there."""
        shape = meta["shape"]
        flat = (int(np.prod(shape[:-2])), *shape[-2:])
        arrays = {"mmse": np.zeros(flat, np.float32), "variance": np.zeros(flat, np.float32)}
        if meta.get("keep"):
            arrays["samples"] = np.zeros((meta["kept"], *flat), np.float32)
        layer = self.viewer.layers[meta["layer"]]
        self._live = {"shape": tuple(shape), "arrays": arrays, "layers": {}, "old": {},
                      "var_top": 0.0, "filled": 0, "complete": False,
                      "lims": input_limits(layer, np.zeros(1, np.float32))}
        QTimer.singleShot(30, self._add_next_live)

    def _add_next_live(self) -> None:
        live, meta = self._live, self.meta
        ready = meta.get("ready")
        if not live or meta["layer"] not in self.viewer.layers or not self.task.running:
            if ready is not None:
                ready.set()
            return
        layer = self.viewer.layers[meta["layer"]]
        for key, what in self.LIVE:
            if key in live["arrays"] and key not in live["layers"]:
                self._add_live(layer, key, what)
                QTimer.singleShot(30, self._add_next_live)  # after this turn and its repaint
                return
        # added hidden (a new visible layer's first draw is another ~40 ms in the same turn);
        # the MMSE is shown now, in a turn of its own
        name = live["layers"].get("mmse")
        if name in self.viewer.layers and not live.get("shown"):
            live["shown"] = True
            self.viewer.layers[name].visible = True
            QTimer.singleShot(30, self._add_next_live)
            return
        ready.set()

    def _show_frames(self, events) -> None:
        """Put finished frames into the live arrays and refresh the live layers."""
        live = self._live
        if not live or self.meta["layer"] not in self.viewer.layers:
            return
        arrays = live["arrays"]
        for ev in events:
            f0, f1 = ev.metrics["first"], ev.step
            live["filled"] += f1 - f0
            live["complete"] = live["filled"] >= len(arrays["mmse"])
            arrays["mmse"][f0:f1] = ev.metrics["mmse"]
            arrays["variance"][f0:f1] = ev.metrics["variance"]
            smp = ev.metrics.get("samples")
            if smp is not None and "samples" in arrays:
                arrays["samples"][:, f0:f1] = smp[:len(arrays["samples"])]
            live["var_top"] = max(live["var_top"], float(np.percentile(ev.metrics["variance"],
                                                                       99.5)))
        for key, name in live["layers"].items():
            if name in self.viewer.layers:
                ly = self.viewer.layers[name]
                if key == "variance" and live["var_top"] > ly.contrast_limits[1]:
                    ly.contrast_limits = (0.0, live["var_top"])
                if ly.visible:  # napari refreshes a layer when it is made visible
                    ly.refresh()

    def _add_live(self, layer, key: str, what: str) -> None:
        """The live layer of ``key``: the finished result layer of the same name when there is one
        (predicting again replaces its data; its old data come back if the run is stopped), else a
        new layer named "... · in progress"."""
        from napari.layers import Image

        live = self._live
        shape = live["shape"]
        data = live["arrays"][key]
        data = data.reshape((len(data), *shape) if key == "samples" else shape)
        final = output_name(layer.name, what)
        existing = self.viewer.layers[final] if final in self.viewer.layers else None
        if isinstance(existing, Image) and existing.ndim == data.ndim and not existing.rgb:
            live["old"][key] = (existing.data, existing.metadata)
            existing.data = data
            live["layers"][key] = final
            return
        lims = live["lims"] if key != "variance" else (0.0, max(live["var_top"], 1e-12))
        labels = axis_labels(self.meta["axes"], (SAMPLE_AXIS,) if key == "samples" else ())
        with keep_selection(self.viewer):  # the user's selected layer stays selected
            ly = add_or_replace_image(
                self.viewer, output_name(layer.name, what, "in progress"), data, layer,
                leading=1 if key == "samples" else 0, labels=labels,
                metadata={"hdn": {"source_layer": layer.name, "output": key, "in_progress": True}},
                contrast_limits=lims, colormap="magma" if key == "variance" else None,
                visible=False)
        live["layers"][key] = ly.name

    def _settle_live(self, res) -> dict:
        """Before the result layers are put in place: the live layers take the result's names
        (renamed, not removed); result layers that were replaced live get their old data back
        when the run stopped (a stopped run never overwrites a finished result)."""
        live, self._live = self._live, {}
        shown: dict = {}
        if not live:
            return shown
        layer_name = self.meta["layer"]
        done = res is not None and not res.info.get("stopped")
        settings = result_settings(res) if res is not None else ""
        for key, what in self.LIVE:
            name = live["layers"].get(key)
            if name is None or name not in self.viewer.layers:
                continue
            ly = self.viewer.layers[name]
            if key in live["old"]:  # a finished result, replaced live
                if res is None or res.info.get("stopped"):
                    ly.data, ly.metadata = live["old"][key]
                elif live["complete"]:
                    shown[key] = tuple(ly.contrast_limits)
                continue
            target = output_name(layer_name, what, settings)
            if res is None or (key == "samples" and res.samples is None):
                ly.name = output_name(layer_name, what, "stopped, nothing finished")
            elif target not in self.viewer.layers:
                ly.name = target
            else:  # a layer of that name that cannot take the result (another kind): rare
                self.viewer.layers.remove(ly)
                continue
            if done and live["complete"]:  # it shows the whole result already
                shown[key] = tuple(ly.contrast_limits)
        return shown

    def on_result(self, out) -> TaskState:
        try:
            return self._on_result(out)
        finally:
            gc.unfreeze()

    def _on_result(self, out) -> TaskState:
        meta = self.meta
        shown = self._settle_live(out.value)
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
        self.last_layers = add_result_layers(self.viewer, layer, res, meta["model"], meta["axes"],
                                             shown=shown, select=self._select_later)
        names = ", ".join(ly.name for ly in self.last_layers)
        counts = res.info.get("samples_per_frame") or [res.n_samples]
        drawn = samples_text(counts) if meta["n"] == "auto" else f"{res.n_samples} samples"
        if res.info.get("stopped"):
            if meta["n"] == "auto" and res.info.get("frames", 1) > 1:
                kept = f"the {res.info['frames_done']} of {res.info['frames']} frames finished"
                text = f"Stopped: {kept} ({drawn}) are in {names}."
            else:
                kept = f"the {res.n_samples} samples drawn"
                of = "" if meta["n"] == "auto" else f" of {meta['n']}"
                text = (f"Stopped after {res.n_samples}{of} samples: their MMSE and variance are "
                        f"in {names}.")
            self.show_status(text)
            notify_info(f"Prediction stopped; kept {kept}.")
            return TaskState.STOPPED
        self.show_status(f"Done in {self.elapsed():.1f} s ({drawn}): {names}.")
        return TaskState.DONE

    def _select_later(self, result_layer) -> None:
        """Select ``result_layer`` in the next event-loop turn (after the renames and data of the
        result layers have been drawn), unless it is gone by then."""

        def select():
            if result_layer in self.viewer.layers:
                self.viewer.layers.selection.active = result_layer

        QTimer.singleShot(0, select)

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
        exporting = self.side_tasks["Export"].task.running if "Export" in self.side_tasks else False
        self.export_btn.setEnabled(self.model_combo.current_entry() is not None and not exporting)


def samples_text(counts) -> str:
    """'8 samples per frame' or '8-24 samples per frame, 9.1 on average'."""
    lo, hi = min(counts), max(counts)
    if lo == hi:
        return f"{lo:g} samples per frame"
    return f"{lo:g}-{hi:g} samples per frame, {sum(counts) / len(counts):.1f} on average"


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def progress_text(metrics: dict, value: int, maximum: int) -> str:
    """The status line of a running prediction: what is done, samples per frame, time left."""
    unit = metrics.get("unit", "sample")
    parts = [f"Sampling… {value} / {maximum} {unit}s"]
    if unit != "sample" and metrics.get("samples_per_frame") is not None:
        parts.append(f"{metrics['samples_per_frame']:.1f} samples per frame")
    if metrics.get("channels"):
        parts.append(f"channel {metrics['channel'] + 1} of {metrics['channels']}")
    eta = metrics.get("eta_s")
    parts.append(f"about {duration_text(eta)} left" if eta is not None else "estimating the time…")
    return " · ".join(parts)


def gc_freeze() -> None:
    """Leave the objects alive now out of Python's cyclic garbage collection until the job ends
    (``gc.unfreeze``). With torch and napari loaded a full collection scans millions of objects:
    ~0.2-0.3 s on a 2-core CPU, in whichever thread triggers it, the GUI's included (napari also
    runs one on every layer removal). Frozen, a collection scans only what the job created."""
    gc.freeze()
