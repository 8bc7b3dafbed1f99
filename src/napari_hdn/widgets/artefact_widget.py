"""Artefact removal: switch latent levels per level, preview live on a crop, apply to the image.

The bottom-up pass of the preview crop is computed once (a :class:`PosteriorSampler`) and cached;
a toggle only re-runs the top-down pass, which is what makes the preview fast. Previews run in a
worker thread, latest request wins: a toggle during a preview queues one more preview with the
newest settings.

Next to each level's choice the widget shows what switching that level alone costs on the preview
crop: the fraction of the (all-levels-on) preview's energy it removes, and in the tooltip the
change of the noisy data's log-likelihood under the noise model. Stripes carry little energy; a
level that removes much more carries signal. Each level's cost needs one extra top-down pass the
first time (none when it is the only level off); costs are cached per crop.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QStandardItemModel
from qtpy.QtWidgets import QCheckBox, QComboBox, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton

from ..engine import LATENT_MODES, InputError, describe_levels, fine_tune, predict_in_rounds
from ..engine.network.multichannel import MultiChannelModel
from ..engine.prediction.levels import MAX_GROWTH, STRUCTURE_LIMIT
from ..engine.prediction.levels import mean_log_likelihood as _mean_log_likelihood
from ..engine.prediction.sampling import inference_model
from ..session import Registry
from ._base import EngineWidget, TaskState
from ._forms import MAX_SEED, combo, form, rule_range, scroll_body, set_message, spin, status_label
from ._inputs import NO_MODEL, LayerChooser, SessionChooser, check_model_fits, chosen_model_and_image
from ._layers import (
    add_or_replace_image,
    add_result_layers,
    axis_labels,
    input_limits,
    levels_text,
    output_name,
)
from ._workers import EngineTask, Outcome, user_message

MODE_HELP = {
    "posterior": "normal: z drawn from the posterior, i.e. the image reaches this level",
    "prior-sample": "the image does not reach this level: z is drawn from the prior given the "
                    "levels above (removes structure of this scale that the coarser levels do not "
                    "explain; the MMSE averages over the draws)",
    "prior-mean": "the image does not reach this level: z is the mean predicted from the levels "
                  "above (removes structure of this scale that the coarser levels do not explain)",
    "zero": "z = 0 at this level (switches the level off entirely; harsher than prior-mean)",
}
MAX_CACHED_SAMPLERS = 3
#: posterior samples per setting when the widget suggests levels
SUGGEST_SAMPLES = 8
VERDICT_TEXT = {"artefact": "artefact-like", "signal": "image detail ⚠", "nothing": "removes little"}
COST_TIP = (
    "Switching level {lv} alone to '{mode}' removes {energy:.1%} of the energy of the preview with "
    "all levels on (sum of squared changes / sum of squared deviations from its mean), and changes "
    "the noisy data's mean log-likelihood under the noise model by {dll:+.4f} nats/pixel. Structured "
    "noise such as stripes carries a few percent; a level that removes much more carries signal."
)


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


MIN_PREVIEW_SIDE = 64


def _centred_axis(size: int, c: float, n: int, m: int) -> tuple[int, int]:
    """(origin, length) of a window of about ``n`` along an axis of ``size`` centred on ``c``.

    The origin must be a multiple of ``m`` (the latent noise is keyed to it), so the length adapts
    instead: the window is centred on ``c`` to within half a pixel unless the image ends first. It
    is at most ``n`` long, unless that would leave it shorter than ``MIN_PREVIEW_SIDE``.
    """
    n = max(1, min(n, size))
    if c - n / 2 <= 0:
        return 0, n
    if c + n / 2 >= size:
        a = max(0, (size - n) // m * m)
        return a, size - a
    a = -(-int(np.floor(c - n / 2)) // m) * m  # the first aligned origin inside the window
    length = int(round(2 * (c - a)))
    if length < min(n, MIN_PREVIEW_SIDE):  # start one step earlier: a longer window
        a -= m
        length += 2 * m
    return a, max(1, min(length, size - a))


def centred_region(H: int, W: int, cy: float, cx: float, h: int, w: int, m: int):
    """Window of about h x w inside H x W centred on (cy, cx), origin a multiple of ``m``."""
    y0, hh = _centred_axis(H, cy, h, m)
    x0, ww = _centred_axis(W, cx, w, m)
    return y0, x0, hh, ww


def level_cost(reference: np.ndarray, changed: np.ndarray, ll_ref: float, ll_changed: float) -> dict:
    """What a level setting costs against the all-levels-on ``reference`` (see the module doc)."""
    ref = reference.astype(np.float64)
    energy = float(((ref - ref.mean()) ** 2).sum())
    removed = float(((ref - changed.astype(np.float64)) ** 2).sum())
    return {"energy": removed / energy if energy > 0 else 0.0, "dll": ll_changed - ll_ref}


class ArtefactWidget(EngineWidget):
    """Per-level latent control with a live preview, and "Apply" to restore the whole image.

    State flow: a model from the session + an image layer -> one mode control per level (1 =
    bottom, finest) with its cost -> on each change a preview job in a worker (cached bottom-up
    pass of the crop, top-down pass with the new modes) -> the layer "HDN preview · <layer>" placed
    over the crop. "Apply" runs the prediction with those modes on the whole layer and adds
    MMSE/variance layers whose name and metadata say which levels were off.
    """

    what = "Apply"
    stopping_text = "Stopping: the samples drawn so far are kept…"

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(napari_viewer, parent)
        self.apply_task = self.task
        self.preview_task = EngineTask(self, lambda ev: None, self._on_preview_done, poll_ms=200)
        self.suggest_task = EngineTask(self, lambda ev: None, self._on_suggest_done, poll_ms=200)
        self.level_report = None  # the last LevelReport, with the key of its crop
        self._report_meta: dict = {}
        self.tuned_entry = None
        self._samplers: OrderedDict = OrderedDict()
        self._net: tuple | None = None  # (model, its inference copy): one copy per model
        self._references: dict = {}  # (sampler key, n, seed) -> (all-on preview, its log-likelihood)
        self._costs: dict = {}  # (sampler key, n, seed, level, mode) -> cost dict
        self._pending = False
        self._requested_at = 0.0
        self._preview_meta: dict = {}
        self.last_preview_seconds: float | None = None
        self.last_preview: dict | None = None
        self.previews_done = 0
        self.mode_boxes: dict[int, QComboBox] = {}
        self.cost_labels: dict[int, QLabel] = {}
        self.last_layers: list = []

        lay = scroll_body(self)
        box = QGroupBox("Input")
        self.model_combo = SessionChooser(Registry.MODELS)
        self.layer_combo = LayerChooser(napari_viewer)
        box.setLayout(form([("Model", self.model_combo), ("Image layer", self.layer_combo)]))
        lay.addWidget(box)

        self.levels_box = QGroupBox("Latent levels")
        self.levels_box.setToolTip("Level 1 is the bottom of the hierarchy (finest detail), the "
                                   "last level the top (coarsest). 'px': how many image pixels one "
                                   "latent pixel of the level spans. The last column: what "
                                   "switching the level alone costs on the preview crop.")
        self.levels_grid = QGridLayout()
        self.levels_box.setLayout(self.levels_grid)
        lay.addWidget(self.levels_box)
        self.cost_summary = status_label()
        lay.addWidget(self.cost_summary)
        self.warning = status_label()
        self.warning.setVisible(False)
        lay.addWidget(self.warning)
        row = QHBoxLayout()
        self.suggest_btn = QPushButton("Suggest")
        self.suggest_btn.setToolTip(
            "Switch off the bottom 1, 2, ... levels in turn on the preview crop (prior-mean, "
            f"{SUGGEST_SAMPLES} samples each) and judge what each removes: an artefact is "
            "independent of the image, real detail is strongest where the image has structure. "
            "Selects the deepest run of bottom levels whose removal looks like an artefact.")
        self.reset_btn = QPushButton("All on")
        self.reset_btn.setToolTip("Set every level back to 'posterior'")
        row.addWidget(self.suggest_btn)
        row.addWidget(self.reset_btn)
        row.addStretch(1)
        lay.addLayout(row)

        box = QGroupBox("Preview")
        self.region = combo(["visible region", "crop"], "Preview the part of the image on screen "
                            "(centred on the view, up to the preview size) or a fixed crop")
        crop_row = QHBoxLayout()
        self.crop_y = spin(0, 99999, 0, 16, "Top row of the crop (rounded down to a multiple of "
                           "2^levels)")
        self.crop_x = spin(0, 99999, 0, 16, "Left column of the crop (rounded down to a multiple "
                           "of 2^levels)")
        self.crop_size = spin(*rule_range("crop", most=4096), 128, 16, "Crop side in pixels")
        crop_row.addWidget(self.crop_y)
        crop_row.addWidget(self.crop_x)
        self.preview_side = spin(0, 2048, 0, 32, "Largest preview side in pixels (auto: from the "
                                 "model's size, aiming at about a second per update on a CPU)",
                                 special="auto")
        self.preview_samples = spin(*rule_range("n_samples", most=64), 1, 1,
                                    "Samples averaged in the preview (each adds one "
                                    "top-down pass)")
        self.seed = spin(*rule_range("seed", most=MAX_SEED), 0, 1,
                         "Same seed, same samples: only the level settings "
                         "change between previews")
        self.live = QCheckBox("Update on every change")
        self.live.setChecked(True)
        f = form([("Region", self.region)])
        f.addRow("Crop y, x", crop_row)
        for label, w in (("Crop size", self.crop_size), ("Preview size", self.preview_side),
                         ("Preview samples", self.preview_samples), ("Seed", self.seed),
                         ("", self.live)):
            f.addRow(label, w)
        box.setLayout(f)
        lay.addWidget(box)
        row = QHBoxLayout()
        self.preview_btn = QPushButton("Preview")
        row.addWidget(self.preview_btn)
        lay.addLayout(row)

        box = QGroupBox("Fine-tune with the levels off withheld")
        box.setToolTip("The paper's recipe for line artefacts is a model trained with the bottom "
                       "levels withheld from the image. Fine-tuning starts from this model: a few "
                       "hundred steps instead of a new training. The tuned model is added to the "
                       "models, and the preview shows it next to the prediction-time setting. "
                       "It paid off for models trained from scratch; for models started from the "
                       "pretrained prior (the presets' default) the prediction-time setting scored "
                       "0.3-1.0 dB higher on the artefact benchmark: compare both before keeping "
                       "the tuned model.")
        self.tune_steps = spin(*rule_range("max_steps", least=10, most=100000), 300, 50,
                               "Training steps of the fine-tuning (about a "
                               "second each for the fast CPU preset on a laptop CPU)")
        self.tune_btn = QPushButton("Fine-tune")
        self.tune_btn.setToolTip("Train this model on, on the image layer, with the levels that are "
                                 "off withheld (Stop keeps the best model so far)")
        f = form([("Steps", self.tune_steps)])
        f.addRow("", self.tune_btn)
        box.setLayout(f)
        lay.addWidget(box)

        box = QGroupBox("Apply to the whole layer")
        self.apply_samples = spin(*rule_range("n_samples", most=10000), 50, 10,
                                  "Posterior samples averaged for the MMSE")
        inner = form([("Samples", self.apply_samples)])
        box.setLayout(inner)
        lay.addWidget(box)
        self.apply_btn, self.apply_stop = self.run_btn, self.stop_btn
        self.add_run_row(lay, "Apply", progress_format="%v / %m samples",
                         idle_text="Choose a model and an image layer; change a level to preview, "
                         "or press Suggest.")
        lay.addStretch(1)

        self.model_combo.currentIndexChanged.connect(self._rebuild_levels)
        self.layer_combo.currentIndexChanged.connect(self.update_controls)
        # a new layer choice waits for the next toggle or Preview (layers also change when the
        # viewer closes, and no job may start then)
        self.region.currentTextChanged.connect(lambda *_: self._changed())
        for w in (self.crop_y, self.crop_x, self.crop_size, self.preview_side,
                  self.preview_samples, self.seed):
            w.valueChanged.connect(lambda *_: self._changed())
        self.preview_btn.clicked.connect(lambda: self.request_preview())
        self.reset_btn.clicked.connect(self.reset_levels)
        self.suggest_btn.clicked.connect(lambda: self.suggest())
        self.tune_btn.clicked.connect(lambda: self.fine_tune())
        napari_viewer.layers.events.removed.connect(self._on_layer_removed)
        self.destroyed.connect(lambda *_, ev=napari_viewer.layers.events.removed,
                               f=self._on_layer_removed: _disconnect(ev, f))
        self._rebuild_levels()
        self.set_state(TaskState.IDLE)

    # -- level controls -----------------------------------------------------------------------------
    def _model(self):
        e = self.model_combo.current_entry()
        return e.model if e is not None else None

    def _rebuild_levels(self, *_) -> None:
        while self.levels_grid.count():
            item = self.levels_grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.mode_boxes, self.cost_labels = {}, {}
        self.level_report = None
        self._samplers.clear()
        self._net = None
        self._references.clear()
        self._costs.clear()
        self.cost_summary.setText("")
        model = self._model()
        if model is None:
            self.levels_grid.addWidget(QLabel("No model yet: train or load one."), 0, 0)
            self.update_controls()
            return
        L = model.levels
        defaults = model.default_modes()
        for row, lv in enumerate(range(L, 0, -1)):
            where = " (top)" if lv == L else (" (bottom)" if lv == 1 else "")
            lab = QLabel(f"Level {lv}{where}")
            lab.setToolTip(f"Latent pixels of level {lv} cover {2**lv}x{2**lv} image pixels; "
                           f"switching it off removes structure of about that scale and finer.")
            box = combo(LATENT_MODES, min_chars=8)
            for i, m in enumerate(LATENT_MODES):
                box.setItemData(i, MODE_HELP[m], Qt.ItemDataRole.ToolTipRole)
            box.setCurrentText(defaults[lv - 1])
            if lv in model.config.deactivated_levels:
                item_model = box.model()
                if isinstance(item_model, QStandardItemModel):
                    item_model.item(0).setEnabled(False)
                box.setToolTip("This level was switched off during training: its posterior was "
                               "never trained")
            box.currentTextChanged.connect(lambda *_: self._changed(levels=True))
            cost = QLabel("")
            cost.setMinimumWidth(60)
            self.levels_grid.addWidget(lab, row, 0)
            self.levels_grid.addWidget(QLabel(f"{2**lv} px"), row, 1)
            self.levels_grid.addWidget(box, row, 2)
            self.levels_grid.addWidget(cost, row, 3)
            self.mode_boxes[lv] = box
            self.cost_labels[lv] = cost
        self.update_controls()

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
            self.show_error("Artefact removal: no model: train one or load a .hdn file first.")
            return False

        def check():
            full = self.level_modes()
            for lv, m in modes.items():
                if not 1 <= int(lv) <= model.levels:
                    raise InputError(
                        f"this model has {model.levels} levels (1..{model.levels}); level {lv} "
                        "does not exist. Settings made for a model with more levels do not apply: "
                        "set the levels of this model"
                    )
                full[int(lv) - 1] = m
            return model.resolve_modes(full)

        if self.guard("Artefact removal", check) is None:
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
        if levels:
            self._show_costs()
            model = self._model()
            if (self.level_report is None and model is not None
                    and self.level_modes() != model.default_modes()):
                self.suggest(select=False)  # verdicts (and warnings) for the levels switched off
        if self.live.isChecked() and self._model() is not None and self.mode_boxes:
            if levels or self.last_preview is not None:
                self.request_preview(quiet=not levels)

    def _view_centre(self, layer, lead: int):
        """The centre of the view in the layer's data coordinates (y, x), or None when the last
        two axes are not the ones displayed."""
        dims = self.viewer.dims
        if dims.ndisplay != 2 or tuple(dims.displayed)[-2:] != (dims.ndim - 2, dims.ndim - 1):
            return None
        scene = getattr(self.viewer, "scene", None)
        camera = scene.camera if scene is not None else self.viewer.camera
        point = np.asarray(dims.point, float)
        point[-2:] = np.asarray(camera.center, float)[-2:]
        return np.asarray(layer.world_to_data(point), float)[-2:]

    def preview_region(self, layer, arr, model) -> Region:
        """The crop to preview: centred on the view (visible region) or the chosen crop."""
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
        centre = self._view_centre(layer, lead)
        if centre is not None:
            cp = np.asarray(layer.corner_pixels)[:, -2:]
            (a, b), (c, d) = cp[0], cp[1] + 1
            if c > a and d > b:
                # at most 3/4 of what is visible, leaving a margin of input around it for comparison
                vh, vw = min(side, int(0.75 * (c - a))), min(side, int(0.75 * (d - b)))
            cy, cx = (float(np.clip(centre[0], 0, H)), float(np.clip(centre[1], 0, W)))
        vh, vw = max(vh, min(MIN_PREVIEW_SIDE, H)), max(vw, min(MIN_PREVIEW_SIDE, W))
        y0, x0, h, w = centred_region(H, W, cy, cx, int(vh), int(vw), m)
        return Region(frame, y0, x0, h, w)

    def request_preview(self, quiet: bool = False) -> bool:
        """Start a preview now, or after the running one (the newest settings win)."""
        self._requested_at = time.perf_counter()
        if self.preview_task.running:
            self._pending = True
            return True
        if quiet:
            try:
                prep = self._prepare_preview()
            except Exception:  # noqa: BLE001 - a settings change while inputs are incomplete
                return False
        else:
            prep = self.guard("Preview", self._prepare_preview)
        if prep is None:
            return False
        job, meta = prep
        self._preview_meta = meta
        self.show_status("Previewing…")
        self.preview_task.start(job, name="napari-hdn preview", interactive=True)
        return True

    def _checked_inputs(self):
        """(model entry, layer, its data, model, level modes), checked; raises InputError."""
        entry, layer, arr = chosen_model_and_image(self.model_combo, self.layer_combo)
        if isinstance(entry.model, MultiChannelModel):
            raise InputError(
                f"'{entry.name}' holds one HDN per channel ({entry.model.channels} channels); "
                "artefact removal works on one channel's model: restore every channel in Predict "
                "and explore (its latent levels stay on), or train a model on the channel with "
                "artefacts alone (right-click its layer > Split Stack) and use that one here")
        check_model_fits(entry.model, arr, layer.name)
        return entry, layer, arr, entry.model, entry.model.resolve_modes(self.level_modes())

    def _prepare_preview(self):
        entry, layer, arr, model, modes = self._checked_inputs()
        reg = self.preview_region(layer, arr, model)
        crop = np.ascontiguousarray(arr[reg.frame][reg.y0:reg.y0 + reg.h, reg.x0:reg.x0 + reg.w])
        # keyed by the crop's content (layers reach plugins through proxies, so identities are
        # not stable, and content also catches edited data)
        digest = hashlib.blake2b(crop.tobytes(), digest_size=16).digest()
        key = (id(model), *reg.key(), crop.shape, str(crop.dtype), digest)
        sampler = self._samplers.get(key)
        net = self._net[1] if self._net is not None and self._net[0] is model else None
        n, seed = self.preview_samples.value(), self.seed.value()
        ref_key = (key, n, seed)
        reference = self._references.get(ref_key)
        known = {k[-2:]: v for k, v in self._costs.items() if k[:-2] == ref_key}
        # costs are against the model's own setting (levels withheld in training stay off)
        base = model.default_modes()

        def job(report, stop):
            t0 = time.perf_counter()
            ready = net if net is not None else inference_model(model)
            s = sampler if sampler is not None else ready.sampler(crop, origin=(reg.y0, reg.x0))
            t1 = time.perf_counter()
            mmse, _, _ = s.sample(n, modes, seed=seed, stop_flag=stop)
            t2 = time.perf_counter()
            out = {"sampler": s, "net": ready, "mmse": mmse, "bottom_up_s": t1 - t0, "top_down_s": t2 - t1,
                   "cached": sampler is not None}
            # the cost of each level that is off, against all levels on (cached per crop)
            off = [(lv + 1, m) for lv, m in enumerate(modes) if m != base[lv]]
            ll = lambda img: _mean_log_likelihood(model.noise_model, crop, img)  # noqa: E731
            ref = reference
            if ref is None and (not off or any(o not in known for o in off)):
                ref_img = mmse if not off else s.sample(n, base, seed=seed, stop_flag=stop)[0]
                ref = (ref_img, ll(ref_img))
            out["reference"] = ref
            costs = {}
            for lv, m in off:
                if (lv, m) in known:
                    costs[(lv, m)] = known[(lv, m)]
                    continue
                alone = mmse if len(off) == 1 else s.sample(
                    n, [m if i + 1 == lv else base[i] for i in range(len(modes))], seed=seed,
                    stop_flag=stop)[0]
                costs[(lv, m)] = level_cost(ref[0], alone, ref[1], ll(alone))
            out["costs"] = costs
            total = None
            if off and ref:  # one level off: its own cost is the total (the same image)
                total = costs[off[0]] if len(off) == 1 else level_cost(ref[0], mmse, ref[1], ll(mmse))
            out["total_cost"] = total
            out["cost_s"] = time.perf_counter() - t2
            return out

        meta = {"layer": layer.name, "region": reg, "modes": modes, "key": key, "model": entry.name,
                "n": n, "seed": seed, "axes": {2: "YX", 3: "SYX", 4: "STYX"}[arr.ndim]}
        return job, meta

    def _on_preview_done(self, out: Outcome) -> None:
        meta = self._preview_meta
        if not out.ok:
            msg, _ = user_message(out.error, "Preview")
            self.show_error(msg)
        elif meta["layer"] not in self.viewer.layers:
            self.show_status(f"'{meta['layer']}' was removed while previewing: the preview was "
                             "discarded. Choose an image layer to preview again.")
        elif out.value is not None:
            res = out.value
            key = meta["key"]
            self._samplers[key] = res["sampler"]
            if self._model() is not None and id(self._model()) == key[0]:
                self._net = (self._model(), res["net"])
            self._samplers.move_to_end(key)
            while len(self._samplers) > MAX_CACHED_SAMPLERS:
                old = self._samplers.popitem(last=False)[0]
                for d in (self._references, self._costs):
                    for k in [k for k in d if k[0] == old]:
                        del d[k]
            ref_key = (key, meta["n"], meta["seed"])
            if res["reference"] is not None:
                self._references[ref_key] = res["reference"]
            for (lv, m), c in res["costs"].items():
                self._costs[(*ref_key, lv, m)] = c
            self._show_preview(meta, res)
            self._show_costs(res.get("total_cost"))
        elif out.stopped:
            self.show_status("Preview stopped.")
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
                             contrast_limits=input_limits(layer, data),
                             labels=axis_labels(meta["axes"]))
        self.last_preview_seconds = time.perf_counter() - self._requested_at
        self.last_preview = {**md["hdn"], **{k: res[k] for k in ("bottom_up_s", "top_down_s", "cached")}}
        self.previews_done += 1
        what = "cached bottom-up pass" if res["cached"] else f"bottom-up {res['bottom_up_s']:.2f} s"
        costs = f", costs {res['cost_s']:.2f} s" if res["cost_s"] > 0.01 else ""
        setting = levels_text(meta["modes"]) or "all levels on"
        self.show_status(
            f"Preview {reg.h}x{reg.w} at ({reg.y0}, {reg.x0}): {setting}; "
            f"{self.last_preview_seconds:.2f} s ({what}, top-down {res['top_down_s']:.2f} s{costs})."
        )

    def _show_costs(self, total: dict | None = None) -> None:
        """Each level's cost next to its choice (for the current crop, when known)."""
        meta = self._preview_meta
        ref_key = (meta.get("key"), meta.get("n"), meta.get("seed"))
        modes = self.level_modes() if self.mode_boxes else []
        model = self._model()
        base = model.default_modes() if model is not None else ["posterior"] * len(modes)
        for lv, label in self.cost_labels.items():
            mode = modes[lv - 1]
            as_trained = mode == base[lv - 1]  # no cost: the model's own setting
            c = self._costs.get((*ref_key, lv, mode)) if not as_trained else None
            v = self._verdict(lv)
            verdict = f" · {VERDICT_TEXT[v.verdict]}" if v is not None else ""
            vtip = (f"\n\nSuggest (bottom levels switched off in turn): level {lv} removes "
                    f"{v.energy:.3f} x the pixel noise variance; correlation of where it removes "
                    f"with where the image has structure {v.structure:+.2f} (above "
                    f"{STRUCTURE_LIMIT} reads as image detail, as does removing more than "
                    f"{MAX_GROWTH:g} x what the level below removed); log-likelihood "
                    f"{v.dll:+.4f} nats/px." if v is not None else "")
            if as_trained:
                label.setText(verdict[3:] if mode == "posterior" else "withheld in training")
                label.setToolTip(vtip.strip())
            elif c is None:
                label.setText("…" + verdict)
                label.setToolTip("computed with the next preview" + vtip)
            else:
                label.setText(f"−{c['energy']:.1%} energy{verdict}")
                label.setToolTip(COST_TIP.format(lv=lv, mode=mode, **c) + vtip)
        self._show_warning(modes)
        if total is not None:
            self.cost_summary.setText(
                f"This setting removes {total['energy']:.1%} of the preview's energy; the noisy "
                f"data's log-likelihood changes by {total['dll']:+.4f} nats/px (on the preview crop, "
                "against the model's own setting).")
        elif modes == base:
            self.cost_summary.setText("")

    def _on_layer_removed(self, event) -> None:
        """The preview of a deleted layer goes with it; a preview running on it is stopped."""
        name = getattr(event.value, "name", None)
        if name is None:
            return
        if self.preview_task.running and self._preview_meta.get("layer") == name:
            self._pending = False
            self.preview_task.stop()
        orphan = output_name(name, "preview")
        # after the layer list has finished this removal
        QTimer.singleShot(0, lambda v=self.viewer, o=orphan: _remove_layer(v, o))
        if self._preview_meta.get("layer") == name:
            set_message(self.status, f"'{name}' was removed: its preview was discarded. Choose an "
                        "image layer to preview again.")

    # -- apply --------------------------------------------------------------------------------------
    def blocker(self) -> str:
        if not self.mode_boxes:
            return NO_MODEL
        if self.layer_combo.current_layer() is None:
            return "choose the image layer to restore"
        return ""

    def apply(self) -> bool:
        """Restore the whole layer with the current level settings (MMSE and variance layers)."""
        return self.start()

    def on_start(self, meta: dict) -> None:
        super().on_start(meta)
        self.progress.setFormat("%v / %m steps" if meta.get("kind") == "fine-tune"
                                else "%v / %m samples")

    # -- suggestion ---------------------------------------------------------------------------------
    def suggest(self, select: bool = True) -> bool:
        """Describe the levels on the preview crop (in the background) and select the suggestion.

        With ``select=False`` (run by itself the first time a level is switched off) only the
        verdicts beside the levels and the warning are updated; the levels stay as they are.
        """
        if self.suggest_task.running:
            return False
        if select:
            prep = self.guard("Suggest", self._prepare_suggest)
        else:
            try:
                prep = self._prepare_suggest()
            except Exception:  # noqa: BLE001 - inputs incomplete: the user has not asked for it
                return False
        if prep is None:
            return False
        job, meta = prep
        self._report_meta = {**meta, "select": select}
        if select:
            self.show_status("Suggest: switching off the bottom levels in turn on the preview "
                             "crop…")
        self.suggest_task.start(job, name="napari-hdn suggest levels")
        self.update_controls()
        return True

    def _prepare_suggest(self):
        entry, layer, arr, model, _ = self._checked_inputs()
        reg = self.preview_region(layer, arr, model)
        crop = np.ascontiguousarray(arr[reg.frame][reg.y0:reg.y0 + reg.h, reg.x0:reg.x0 + reg.w])
        seed = self.seed.value()

        def job(report, stop):
            return describe_levels(model, crop, n_samples=SUGGEST_SAMPLES, seed=seed,
                                   crop=max(crop.shape), stop_flag=stop)

        return job, {"model": model, "layer": layer.name, "region": reg}

    def _on_suggest_done(self, out: Outcome) -> None:
        meta = self._report_meta
        self.update_controls()
        if not out.ok:
            if meta.get("select"):
                msg, _ = user_message(out.error, "Suggest")
                self.show_error(msg)
            return
        if out.value is None or self._model() is not meta.get("model"):
            if meta.get("select"):
                self.show_status("Suggest stopped (or the model changed): no setting was chosen.")
            return
        rep = out.value
        self.level_report = rep
        if not meta.get("select"):
            self._show_costs()  # verdicts and the warning; the choice stays the user's
            return
        off = rep.levels_off
        self.set_level_modes(dict(enumerate(rep.suggested, start=1)))
        reg = meta["region"]
        where = f"on the {reg.h}x{reg.w} crop at ({reg.y0}, {reg.x0})"
        self.show_status(
            (f"Suggested: levels {', '.join(map(str, off))} {rep.mode} " if off else
             "Suggested: every level on (no level's removal looks like an artefact) ")
            + f"{where}. " + " ".join(f"Level {st.level}: {VERDICT_TEXT[st.verdict]}."
                                      for st in rep.steps)
            # e.g. why a higher level that also looks like an artefact was left on
            + "".join(f" {n[0].upper()}{n[1:]}." for n in rep.notes if off))

    def _verdict(self, level: int):
        rep = self.level_report
        return rep.step(level) if rep is not None else None

    def _show_warning(self, modes: list[str]) -> None:
        """Warn when a level that is off removes what looks like detail of the image."""
        bad = [lv for lv, m in enumerate(modes, start=1)
               if m != "posterior" and (v := self._verdict(lv)) is not None and v.verdict == "signal"]
        if bad:
            text = (f"Level{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: what switching "
                    "off removes looks like real detail (it is strongest where the image has "
                    "structure), not like an artefact: the result may lose real structure. "
                    "Suggest picks a safer setting.")
            set_message(self.warning, text, error=True)
        self.warning.setVisible(bool(bad))

    # -- fine-tuning --------------------------------------------------------------------------------
    def fine_tune(self) -> bool:
        """Train the model on with the levels that are off withheld; adds the tuned model."""
        return self.start(self._prepare_fine_tune, what="Fine-tuning")

    def _prepare_fine_tune(self):
        entry, layer, arr, model, modes = self._checked_inputs()
        off = [lv for lv, m in enumerate(modes, start=1)
               if m != "posterior" and lv not in model.config.deactivated_levels]
        if not off:
            raise InputError("switch off the levels to withhold first (or press Suggest): with "
                             "every level as trained there is nothing to fine-tune for")
        steps = self.tune_steps.value()
        axes = {2: "YX", 3: "SYX", 4: "STYX"}[arr.ndim]

        def job(report, stop):
            return fine_tune(model, arr, off, steps=steps, axes=axes, callbacks=report,
                             stop_flag=stop, device=str(model.device))

        return job, {"kind": "fine-tune", "entry": entry, "layer": layer.name, "levels": off,
                     "total": steps, "modes": modes}

    def _on_tuned(self, out) -> TaskState:
        meta = self.meta
        tuned = out.value
        entry = meta["entry"]
        steps = tuned.info["fine_tuned"]["steps"]
        levels = ",".join(map(str, meta["levels"]))
        # keep the prediction-time preview for comparison, under its own name
        layer = meta["layer"]
        old = output_name(layer, "preview")
        if old in self.viewer.layers:
            before = self.viewer.layers[old]
            before.name = output_name(layer, "preview", f"{entry.name} · L{levels} off at prediction")
        self.tuned_entry = self.session.add_model(
            tuned, f"{entry.name} · L{levels} withheld", f"fine-tuned from {entry.name} for {steps} "
            f"steps on '{layer}' with levels {levels} withheld ({tuned.config.withheld_mode})",
            layer_name=layer, axes=entry.axes)
        self.model_combo.setCurrentText(self.tuned_entry.name)  # rebuilds the levels, previews
        self.request_preview(quiet=True)
        self.show_status(f"Fine-tuned for {steps} steps with levels {levels} withheld: added the "
                         f"model '{self.tuned_entry.name}' and previewed it; the preview of the "
                         "prediction-time setting is kept for comparison.")
        return TaskState.STOPPED if tuned.info.get("stopped_early") else TaskState.DONE

    def prepare(self):
        entry, layer, arr, model, modes = self._checked_inputs()
        n = self.apply_samples.value()
        seed = self.seed.value()
        axes = {2: "YX", 3: "SYX", 4: "STYX"}[arr.ndim]

        def job(report, stop):
            return predict_in_rounds(model, arr, n_samples=n, axes=axes, levels=modes, seed=seed,
                                     callbacks=report, stop_flag=stop)

        return job, {"layer": layer.name, "modes": modes, "model": entry.name, "axes": axes,
                     "total": n, "n": n}

    def on_result(self, out) -> TaskState:
        meta = self.meta
        if meta.get("kind") == "fine-tune" and out.value is not None:
            return self._on_tuned(out)
        if out.value is None:
            self.show_status("Apply stopped before any sample was finished; no layers were changed.")
            return TaskState.STOPPED
        if meta["layer"] not in self.viewer.layers:
            self.show_error(f"Apply: layer '{meta['layer']}' was removed while computing; results "
                            "not added.")
            return TaskState.FAILED
        layer = self.viewer.layers[meta["layer"]]
        modes = meta["modes"]
        off = {lv + 1: m for lv, m in enumerate(modes) if m != "posterior"}
        self.last_layers = add_result_layers(
            self.viewer, layer, out.value, meta["model"], meta["axes"], levels_text(modes),
            extra={"levels_off": sorted(off), "level_modes": {str(k): v for k, v in off.items()}})
        note = f" {self.warning.text()}" if not self.warning.isHidden() else ""
        self.show_status("Added " + ", ".join(ly.name for ly in self.last_layers if ly.visible)
                         + note)
        return TaskState.STOPPED if out.value.info.get("stopped") else TaskState.DONE

    def update_controls(self, *_) -> None:
        super().update_controls()
        has = bool(self.mode_boxes)
        self.preview_btn.setEnabled(has)
        self.reset_btn.setEnabled(has)
        if hasattr(self, "suggest_task"):
            self.suggest_btn.setEnabled(has and not self.suggest_task.running)
        if hasattr(self, "tune_btn"):
            self.tune_btn.setEnabled(has and not self.busy and not self.blocker())


def _remove_layer(viewer, name: str) -> None:
    try:
        if name in viewer.layers:
            viewer.layers.remove(name)
    except (RuntimeError, KeyError, ValueError):  # the viewer is closing
        pass


def _disconnect(emitter, slot) -> None:
    try:
        emitter.disconnect(slot)
    except Exception:  # noqa: BLE001 - already gone
        pass
