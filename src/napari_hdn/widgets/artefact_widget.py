"""Artefact removal: switch latent levels per level, preview live on a crop, apply to the image.

The bottom-up pass of the preview crop is computed once (a :class:`PosteriorSampler`) and cached;
a toggle only re-runs the top-down pass, which is what makes the preview fast. Previews run in a
worker thread, latest request wins: a toggle during a preview queues one more preview with the
newest settings.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from qtpy.QtGui import QStandardItemModel
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ..engine import LATENT_MODES, InputError, predict
from ..session import get_session
from ._common import (
    MAX_SEED,
    LayerChooser,
    SessionChooser,
    TaskState,
    add_or_replace_image,
    check_image_layer,
    combo,
    form,
    input_limits,
    notify_error,
    notify_warning,
    output_name,
    run_guarded,
    scroll_body,
    spin,
    status_label,
)
from ._workers import EngineTask, Outcome, user_message
from .predict_widget import add_result_layers, check_model_fits

MODE_HELP = {
    "posterior": "normal: z drawn from the posterior, i.e. the image reaches this level",
    "prior-mean": "the image does not reach this level: z is the mean predicted from the levels "
                  "above (removes structure of this scale that the coarser levels do not explain)",
    "zero": "z = 0 at this level (switches the level off entirely; harsher than prior-mean)",
}
MAX_CACHED_SAMPLERS = 3


def auto_preview_side(model) -> int:
    """Crop side for the live preview such that one top-down pass takes well under a second on CPU.

    The top-down cost per pixel grows with filters^2 x (blocks + 1). Measured through the widget on
    2 CPU cores, one torch thread, one sample (docs/artefact-removal.md): "fast CPU" 256x256 in
    0.47 s, "balanced" 192x192 in 0.61 s, the paper's architecture 128x128 in 0.67 s.
    """
    c = model.config
    units = c.filters**2 * (c.blocks + 1)
    if units <= 32**2 * 3:
        return 256
    if units <= 48**2 * 4:
        return 192
    return 128


@dataclass
class Region:
    """A preview crop: frame index (leading axes) and the 2D window, origin aligned to 2**L."""

    frame: tuple
    y0: int
    x0: int
    h: int
    w: int

    def key(self):
        return (self.frame, self.y0, self.x0, self.h, self.w)


def align_region(H: int, W: int, cy: float, cx: float, h: int, w: int, m: int) -> tuple[int, int, int, int]:
    """Window of about h x w centred on (cy, cx), inside H x W, origin a multiple of ``m``."""
    h, w = max(1, min(h, H)), max(1, min(w, W))
    y0 = int(np.clip(round(cy - h / 2), 0, H - h)) // m * m
    x0 = int(np.clip(round(cx - w / 2), 0, W - w)) // m * m
    return y0, x0, h, w


class ArtefactWidget(QWidget):
    """Per-level latent control with a live preview, and "Apply" to restore the whole image.

    State flow: a model from the session + an image layer -> one mode control per level (1 =
    bottom, finest) -> on each change a preview job in a worker (cached bottom-up pass of the crop,
    top-down pass with the new modes) -> the layer "<layer> HDN preview" placed over the crop.
    "Apply" runs :func:`napari_hdn.engine.predict` with those modes on the whole layer and adds
    MMSE/variance layers whose name and metadata say which levels were off.
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session()
        self.state = TaskState.IDLE
        self.preview_task = EngineTask(self, lambda ev: None, self._on_preview_done, poll_ms=200)
        self.apply_task = EngineTask(self, self._on_apply_events, self._on_apply_done)
        self._samplers: OrderedDict = OrderedDict()
        self._pending = False
        self._requested_at = 0.0
        self.last_preview_seconds: float | None = None
        self.last_preview: dict | None = None
        self.previews_done = 0
        self.mode_boxes: dict[int, QComboBox] = {}

        lay = scroll_body(self)
        box = QGroupBox("Input")
        f = form()
        self.model_combo = SessionChooser("models")
        self.layer_combo = LayerChooser(napari_viewer)
        f.addRow("Model", self.model_combo)
        f.addRow("Image layer", self.layer_combo)
        box.setLayout(f)
        lay.addWidget(box)

        self.levels_box = QGroupBox("Latent levels")
        self.levels_box.setToolTip("Level 1 is the bottom of the hierarchy (finest detail), the "
                                   "last level the top (coarsest). 'px': how many image pixels one "
                                   "latent pixel of the level spans.")
        self.levels_grid = QGridLayout()
        self.levels_box.setLayout(self.levels_grid)
        lay.addWidget(self.levels_box)
        row = QHBoxLayout()
        self.reset_btn = QPushButton("All on")
        self.reset_btn.setToolTip("Set every level back to 'posterior'")
        row.addWidget(self.reset_btn)
        row.addStretch(1)
        lay.addLayout(row)

        box = QGroupBox("Preview")
        f = form()
        self.region = combo()
        self.region.addItems(["visible region", "crop"])
        self.region.setToolTip("Preview the part of the image on screen (centre, up to the preview "
                               "size) or a fixed crop")
        crop_row = QHBoxLayout()
        self.crop_y = spin(0, 99999, 0, 16, "Top row of the crop (rounded down to a multiple of "
                           "2^levels)")
        self.crop_x = spin(0, 99999, 0, 16, "Left column of the crop (rounded down to a multiple "
                           "of 2^levels)")
        self.crop_size = spin(16, 4096, 128, 16, "Crop side in pixels")
        crop_row.addWidget(self.crop_y)
        crop_row.addWidget(self.crop_x)
        self.preview_side = spin(0, 2048, 0, 32, "Largest preview side in pixels (auto: from the "
                                 "model's size, aiming at about a second per update on a CPU)",
                                 special="auto")
        self.preview_samples = spin(1, 64, 1, 1, "Samples averaged in the preview (each adds one "
                                    "top-down pass)")
        self.seed = spin(0, MAX_SEED, 0, 1, "Same seed, same samples: only the level settings "
                         "change between previews")
        self.live = QCheckBox("Update on every change")
        self.live.setChecked(True)
        f.addRow("Region", self.region)
        f.addRow("Crop y, x", crop_row)
        f.addRow("Crop size", self.crop_size)
        f.addRow("Preview size", self.preview_side)
        f.addRow("Preview samples", self.preview_samples)
        f.addRow("Seed", self.seed)
        f.addRow("", self.live)
        box.setLayout(f)
        lay.addWidget(box)
        row = QHBoxLayout()
        self.preview_btn = QPushButton("Preview")
        row.addWidget(self.preview_btn)
        lay.addLayout(row)

        box = QGroupBox("Apply to the whole layer")
        f = form()
        self.apply_samples = spin(1, 10000, 50, 10, "Posterior samples averaged for the MMSE")
        f.addRow("Samples", self.apply_samples)
        row = QHBoxLayout()
        self.apply_btn = QPushButton("Apply")
        self.apply_stop = QPushButton("Stop")
        row.addWidget(self.apply_btn)
        row.addWidget(self.apply_stop)
        f.addRow(row)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m samples")
        f.addRow(self.progress)
        box.setLayout(f)
        lay.addWidget(box)
        self.status = status_label("Choose a model and an image layer; change a level to preview.")
        lay.addWidget(self.status)
        lay.addStretch(1)

        self.model_combo.currentIndexChanged.connect(self._rebuild_levels)
        # a new layer choice waits for the next toggle or Preview (layers also change when the
        # viewer closes, and no job may start then)
        self.region.currentTextChanged.connect(lambda *_: self._changed())
        for w in (self.crop_y, self.crop_x, self.crop_size, self.preview_side,
                  self.preview_samples, self.seed):
            w.valueChanged.connect(lambda *_: self._changed())
        self.preview_btn.clicked.connect(lambda: self.request_preview())
        self.apply_btn.clicked.connect(self.apply)
        self.apply_stop.clicked.connect(self.apply_task.stop)
        self.reset_btn.clicked.connect(self.reset_levels)
        self._rebuild_levels()
        self._update_buttons()

    # -- level controls -----------------------------------------------------------------------------
    def _model(self):
        e = self.model_combo.current_entry()
        return e.model if e is not None else None

    def _rebuild_levels(self, *_) -> None:
        while self.levels_grid.count():
            item = self.levels_grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.mode_boxes = {}
        self._samplers.clear()
        model = self._model()
        if model is None:
            self.levels_grid.addWidget(QLabel("No model yet: train or load one."), 0, 0)
            self._update_buttons()
            return
        L = model.levels
        defaults = model.default_modes()
        for row, lv in enumerate(range(L, 0, -1)):
            where = " (top)" if lv == L else (" (bottom)" if lv == 1 else "")
            lab = QLabel(f"Level {lv}{where}")
            lab.setToolTip(f"Latent pixels of level {lv} cover {2**lv}x{2**lv} image pixels; "
                           f"switching it off removes structure of about that scale and finer.")
            scale = QLabel(f"{2**lv} px")
            box = combo(LATENT_MODES, min_chars=8)
            for i, m in enumerate(LATENT_MODES):
                box.setItemData(i, MODE_HELP[m], 3)  # Qt.ToolTipRole
            box.setCurrentText(defaults[lv - 1])
            if lv in model.config.deactivated_levels:
                item_model = box.model()
                if isinstance(item_model, QStandardItemModel):
                    item_model.item(0).setEnabled(False)
                box.setToolTip("This level was switched off during training: its posterior was "
                               "never trained")
            box.currentTextChanged.connect(lambda *_: self._changed(levels=True))
            self.levels_grid.addWidget(lab, row, 0)
            self.levels_grid.addWidget(scale, row, 1)
            self.levels_grid.addWidget(box, row, 2)
            self.mode_boxes[lv] = box
        self._update_buttons()

    def level_modes(self) -> list[str]:
        """Current mode per level, index 0 = level 1."""
        return [self.mode_boxes[lv].currentText() for lv in sorted(self.mode_boxes)]

    def set_level_mode(self, level: int, mode: str) -> bool:
        """Set one level's mode (as a click would); a notification if it does not exist."""
        return self.set_level_modes({level: mode})

    def set_level_modes(self, modes: dict) -> bool:
        """Set several levels at once ({level: mode}); one preview follows. False if invalid."""
        model = self._model()
        if model is None:
            notify_error("Artefact removal: no model: train one or load a .hdn file first.")
            return False
        try:
            full = self.level_modes()
            for lv, m in modes.items():
                if not 1 <= int(lv) <= model.levels:
                    raise InputError(
                        f"this model has {model.levels} levels (1..{model.levels}); level {lv} "
                        "does not exist. Settings made for a model with more levels do not apply: "
                        "set the levels of this model"
                    )
                full[int(lv) - 1] = m
            model.resolve_modes(full)
        except InputError as exc:
            notify_error(f"Artefact removal: {exc}")
            return False
        for box in self.mode_boxes.values():
            box.blockSignals(True)
        for lv, m in modes.items():
            self.mode_boxes[int(lv)].setCurrentText(str(m).replace("_", "-"))
        for box in self.mode_boxes.values():
            box.blockSignals(False)
        self._changed(levels=True)
        return True

    def reset_levels(self) -> None:
        model = self._model()
        if model is not None:
            self.set_level_modes(dict(enumerate(model.default_modes(), start=1)))

    # -- preview ------------------------------------------------------------------------------------
    def _changed(self, levels: bool = False) -> None:
        if self.live.isChecked() and self._model() is not None and self.mode_boxes:
            if levels or self.last_preview is not None:
                self.request_preview(quiet=not levels)

    def preview_region(self, layer, arr, model) -> Region:
        """The crop to preview: the visible part of the layer (centre) or the chosen crop."""
        m = model.config.downscale
        H, W = arr.shape[-2:]
        lead = arr.ndim - 2
        frame: tuple = ()
        if lead:
            pt = np.asarray(layer.world_to_data(self.viewer.dims.point))[:lead]
            frame = tuple(int(np.clip(round(float(v)), 0, s - 1)) for v, s in zip(pt, arr.shape[:lead]))
        side = self.preview_side.value() or auto_preview_side(model)
        if self.region.currentText() == "crop":
            s = self.crop_size.value()
            y0, x0 = self.crop_y.value() // m * m, self.crop_x.value() // m * m
            if y0 >= H or x0 >= W:
                raise InputError(f"the crop origin ({y0}, {x0}) lies outside the image ({H}x{W})")
            return Region(frame, y0, x0, min(s, H - y0), min(s, W - x0))
        cy, cx, vh, vw = H / 2, W / 2, side, side
        displayed = tuple(self.viewer.dims.displayed)
        if self.viewer.dims.ndisplay == 2 and displayed[-2:] == (self.viewer.dims.ndim - 2,
                                                                 self.viewer.dims.ndim - 1):
            cp = np.asarray(layer.corner_pixels)[:, -2:]
            (a, b), (c, d) = cp[0], cp[1] + 1
            if c > a and d > b:
                # the middle of the view, leaving a margin of input around it for comparison
                cy, cx = (a + c) / 2, (b + d) / 2
                vh, vw = min(side, int(0.75 * (c - a))), min(side, int(0.75 * (d - b)))
        vh, vw = max(vh, min(64, H)), max(vw, min(64, W))
        y0, x0, h, w = align_region(H, W, cy, cx, int(vh), int(vw), m)
        return Region(frame, y0, x0, h, w)

    def request_preview(self, quiet: bool = False) -> bool:
        """Start a preview now, or after the running one (the newest settings win)."""
        self._requested_at = time.perf_counter()
        if self.preview_task.running:
            self._pending = True
            return True
        prep = self._prepare_preview(quiet)
        if prep is None:
            return False
        job, meta = prep
        self._preview_meta = meta
        self.status.setText("Previewing…")
        self.preview_task.start(job, name="napari-hdn preview")
        return True

    def _prepare_preview(self, quiet: bool):
        def prepare():
            entry = self.model_combo.current_entry()
            if entry is None:
                raise InputError("no model: train one in the Training widget or load a .hdn file")
            layer = self.layer_combo.current_layer()
            arr = check_image_layer(layer, "image")
            model = entry.model
            check_model_fits(model, arr, layer.name)
            modes = model.resolve_modes(self.level_modes())
            reg = self.preview_region(layer, arr, model)
            crop = np.ascontiguousarray(arr[reg.frame][reg.y0:reg.y0 + reg.h, reg.x0:reg.x0 + reg.w])
            # keyed by the crop's content (layers reach plugins through proxies, so identities are
            # not stable, and content also catches edited data)
            digest = hashlib.blake2b(crop.tobytes(), digest_size=16).digest()
            key = (id(model), *reg.key(), crop.shape, str(crop.dtype), digest)
            sampler = self._samplers.get(key)
            n, seed = self.preview_samples.value(), self.seed.value()

            def job(report, stop):
                t0 = time.perf_counter()
                s = sampler
                if s is None:
                    s = model.sampler(crop, origin=(reg.y0, reg.x0))
                t1 = time.perf_counter()
                mmse, _, _ = s.sample(n, modes, seed=seed, stop_flag=stop)
                t2 = time.perf_counter()
                return {"sampler": s, "mmse": mmse, "bottom_up_s": t1 - t0, "top_down_s": t2 - t1,
                        "cached": sampler is not None}

            meta = {"layer": layer.name, "region": reg, "modes": modes, "key": key, "model": entry.name,
                    "n": n}
            return job, meta

        if quiet:
            try:
                return prepare()
            except Exception:  # noqa: BLE001 - a settings change while inputs are incomplete
                return None
        return run_guarded("Preview", prepare)

    def _on_preview_done(self, out: Outcome) -> None:
        meta = self._preview_meta
        if not out.ok:
            msg, _ = user_message(out.error, "Preview")
            notify_error(msg)
            self.status.setText(msg)
        elif out.value is not None and meta["layer"] in self.viewer.layers:
            res = out.value
            self._samplers[meta["key"]] = res["sampler"]
            self._samplers.move_to_end(meta["key"])
            while len(self._samplers) > MAX_CACHED_SAMPLERS:
                self._samplers.popitem(last=False)
            self._show_preview(meta, res)
        if self._pending:
            self._pending = False
            self.request_preview(quiet=True)

    def _show_preview(self, meta: dict, res: dict) -> None:
        layer, reg = self.viewer.layers[meta["layer"]], meta["region"]
        sc, tr = np.asarray(layer.scale, float), np.asarray(layer.translate, float)
        lead = len(reg.frame)
        data = res["mmse"].reshape((1,) * lead + res["mmse"].shape)
        pos = np.array([*reg.frame, reg.y0, reg.x0], float)
        translate = tuple(tr + pos * sc)
        off = {lv + 1: m for lv, m in enumerate(meta["modes"]) if m != "posterior"}
        md = {"hdn": {"output": "preview", "source_layer": layer.name, "model": meta["model"],
                      "levels": list(meta["modes"]), "levels_off": off, "n_samples": meta["n"],
                      "frame": list(reg.frame), "origin": [reg.y0, reg.x0]}}
        add_or_replace_image(self.viewer, output_name(layer.name, "preview"), data, layer,
                             translate=translate, metadata=md,
                             contrast_limits=input_limits(layer, data))
        self.last_preview_seconds = time.perf_counter() - self._requested_at
        self.last_preview = {**md["hdn"], **{k: res[k] for k in ("bottom_up_s", "top_down_s", "cached")}}
        self.previews_done += 1
        what = "cached bottom-up pass" if res["cached"] else f"bottom-up {res['bottom_up_s']:.2f} s"
        self.status.setText(
            f"Preview {reg.h}x{reg.w} at ({reg.y0}, {reg.x0}): {_levels_text(meta['modes'])}; "
            f"{self.last_preview_seconds:.2f} s ({what}, top-down {res['top_down_s']:.2f} s)."
        )

    # -- apply --------------------------------------------------------------------------------------
    def apply(self) -> bool:
        """Restore the whole layer with the current level settings (MMSE and variance layers)."""
        if self.apply_task.running:
            notify_warning("Apply is already running.")
            return False
        prep = run_guarded("Apply", self._prepare_apply)
        if prep is None:
            return False
        job, meta = prep
        self._apply_meta = meta
        self.progress.setRange(0, meta["total"])
        self.progress.setValue(0)
        self._set_state(TaskState.RUNNING)
        self.apply_task.start(job, name="napari-hdn apply levels")
        return True

    def _prepare_apply(self):
        entry = self.model_combo.current_entry()
        if entry is None:
            raise InputError("no model: train one in the Training widget or load a .hdn file")
        layer = self.layer_combo.current_layer()
        arr = check_image_layer(layer, "image")
        model = entry.model
        check_model_fits(model, arr, layer.name)
        modes = model.resolve_modes(self.level_modes())
        n = self.apply_samples.value()
        seed = self.seed.value()
        axes = {2: "YX", 3: "SYX", 4: "STYX"}[arr.ndim]

        def job(report, stop):
            return predict(model, arr, n_samples=n, axes=axes, levels=modes, seed=seed,
                           callbacks=report, stop_flag=stop)

        frames = arr.size // (arr.shape[-1] * arr.shape[-2])
        return job, {"layer": layer.name, "modes": modes, "model": entry.name, "axes": axes,
                     "total": n * frames}

    def _on_apply_events(self, events) -> None:
        for ev in events:
            if ev.task == "predict":
                if ev.kind == "start":
                    self.progress.setRange(0, max(1, ev.total))
                self.progress.setValue(ev.step)

    def _on_apply_done(self, out: Outcome) -> None:
        meta = self._apply_meta
        if not out.ok:
            msg, _ = user_message(out.error, "Apply")
            notify_error(msg)
            self.status.setText(msg)
            self._set_state(TaskState.FAILED)
            return
        if out.stopped:
            self.status.setText("Apply stopped; no layers were changed.")
            self._set_state(TaskState.STOPPED)
            return
        if meta["layer"] not in self.viewer.layers:
            notify_warning(f"Layer '{meta['layer']}' was removed while computing; results not added.")
            self._set_state(TaskState.FAILED)
            return
        layer = self.viewer.layers[meta["layer"]]
        modes = meta["modes"]
        off = {lv + 1: m for lv, m in enumerate(modes) if m != "posterior"}
        suffix = ("[off: " + ", ".join(f"{lv} {m}" for lv, m in off.items()) + "]") if off else ""
        self.last_layers = add_result_layers(
            self.viewer, layer, out.value, meta["model"], meta["axes"], suffix,
            extra={"levels_off": sorted(off), "level_modes": {str(k): v for k, v in off.items()}})
        self._set_state(TaskState.DONE)
        self.status.setText("Added " + ", ".join(ly.name for ly in self.last_layers if ly.visible))

    # -- state --------------------------------------------------------------------------------------
    def _set_state(self, state: TaskState) -> None:
        self.state = state
        self._update_buttons()

    def _update_buttons(self) -> None:
        has = bool(self.mode_boxes)
        busy = self.state == TaskState.RUNNING
        self.apply_btn.setEnabled(has and not busy)
        self.apply_stop.setEnabled(busy)
        self.preview_btn.setEnabled(has)
        self.reset_btn.setEnabled(has)


def _levels_text(modes) -> str:
    off = [f"{lv + 1} {m}" for lv, m in enumerate(modes) if m != "posterior"]
    return "all levels on" if not off else "off: " + ", ".join(off)
