"""The artefact widget's forms: the preview settings, the fine-tuning group, and the table of
latent levels (one mode choice per level, beside it what switching that level costs on the preview
crop and what Suggest made of it, below it the cost of the whole setting and a warning when a level
that is off carries image detail). Qt only: the figures come from the engine."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import Qt
from qtpy.QtGui import QStandardItemModel
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..engine import LATENT_MODES, InputError
from ..engine.prediction.level_preview import auto_preview_side, crop_window, view_window
from ..engine.prediction.levels import MAX_GROWTH, STRUCTURE_LIMIT
from ._forms import MAX_SEED, combo, form, rule_range, set_message, spin, status_label

MODE_HELP = {
    "posterior": "normal: z drawn from the posterior, i.e. the image reaches this level",
    "prior-sample": "the image does not reach this level: z is drawn from the prior given the "
                    "levels above (removes structure of this scale that the coarser levels do not "
                    "explain; the MMSE averages over the draws)",
    "prior-mean": "the image does not reach this level: z is the mean predicted from the levels "
                  "above (removes structure of this scale that the coarser levels do not explain)",
    "zero": "z = 0 at this level (switches the level off entirely; harsher than prior-mean)",
}
VERDICT_TEXT = {"artefact": "artefact-like", "signal": "image detail ⚠", "nothing": "removes little"}
COST_TIP = (
    "Switching level {lv} alone to '{mode}' removes {energy:.1%} of the energy of the preview with "
    "all levels on (sum of squared changes / sum of squared deviations from its mean), and changes "
    "the noisy data's mean log-likelihood under the noise model by {dll:+.4f} nats/pixel. Structured "
    "noise such as stripes carries a few percent; a level that removes much more carries signal."
)


def row(*widgets, stretch: bool = False) -> QHBoxLayout:
    """``widgets`` side by side (then a stretch)."""
    out = QHBoxLayout()
    for w in widgets:
        out.addWidget(w)
    if stretch:
        out.addStretch(1)
    return out


class PreviewSettings(QGroupBox):
    """Where the preview is cut from the image, how many samples it averages, and whether it
    follows every change."""

    def __init__(self, parent=None) -> None:
        super().__init__("Preview", parent)
        self.region = combo(["visible region", "crop"], "Preview the part of the image on screen "
                            "(centred on the view, up to the preview size) or a fixed crop")
        self.crop_y = spin(0, 99999, 0, 16, "Top row of the crop (rounded down to a multiple of "
                           "2^levels)")
        self.crop_x = spin(0, 99999, 0, 16, "Left column of the crop (rounded down to a multiple "
                           "of 2^levels)")
        self.crop_size = spin(*rule_range("crop", most=4096), 128, 16, "Crop side in pixels")
        self.preview_side = spin(0, 2048, 0, 32, "Largest preview side in pixels (auto: from the "
                                 "model's size, aiming at about a second per update on a CPU)",
                                 special="auto")
        self.preview_samples = spin(*rule_range("n_samples", most=64), 1, 1,
                                    "Samples averaged in the preview (each adds one top-down pass)")
        self.seed = spin(*rule_range("seed", most=MAX_SEED), 0, 1,
                         "Same seed, same samples: only the level settings change between previews")
        self.live = QCheckBox("Update on every change")
        self.live.setChecked(True)
        self.setLayout(form([("Region", self.region), ("Crop y, x", row(self.crop_y, self.crop_x)),
                             ("Crop size", self.crop_size), ("Preview size", self.preview_side),
                             ("Preview samples", self.preview_samples), ("Seed", self.seed),
                             ("", self.live)]))

    def connect(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change()`` when a setting of the window or the samples changes."""
        self.region.currentTextChanged.connect(lambda *_: on_change())
        for w in (self.crop_y, self.crop_x, self.crop_size, self.preview_side,
                  self.preview_samples, self.seed):
            w.valueChanged.connect(lambda *_: on_change())

    def window(self, shape, model, centre=None, visible=None) -> tuple[int, int, int, int]:
        """(y0, x0, h, w) of the preview of an image of ``shape`` (.., H, W) for ``model``: the
        chosen crop, or centred on ``centre`` with ``visible`` of it on screen (see
        :func:`~napari_hdn.engine.prediction.level_preview.view_window`)."""
        H, W = shape[-2:]
        m = model.config.downscale
        if self.region.currentText() == "crop":
            return crop_window(H, W, m, self.crop_y.value(), self.crop_x.value(),
                               self.crop_size.value())
        side = self.preview_side.value() or auto_preview_side(model)
        return view_window(H, W, m, side, centre, visible)


def fine_tune_box() -> tuple[QGroupBox, QSpinBox, QPushButton]:
    """The fine-tuning group: its box, the steps and the Fine-tune button."""
    box = QGroupBox("Fine-tune with the levels off withheld")
    box.setToolTip("The paper's recipe for line artefacts is a model trained with the bottom "
                   "levels withheld from the image. Fine-tuning starts from this model: a few "
                   "hundred steps instead of a new training. The tuned model is added to the "
                   "models, and the preview shows it next to the prediction-time setting. "
                   "It paid off for models trained from scratch; for models started from the "
                   "pretrained prior (the presets' default) the prediction-time setting scored "
                   "0.3-1.0 dB higher on the artefact benchmark: compare both before keeping "
                   "the tuned model.")
    steps = spin(*rule_range("max_steps", least=10, most=100000), 300, 50,
                 "Training steps of the fine-tuning (about a second each for the fast CPU preset "
                 "on a laptop CPU)")
    button = QPushButton("Fine-tune")
    button.setToolTip("Train this model on, on the image layer, with the levels that are off "
                      "withheld (Stop keeps the best model so far)")
    box.setLayout(form([("Steps", steps), ("", button)]))
    return box, steps, button


class LevelTable(QWidget):
    """Level L (top) down to level 1 (bottom): name, latent pixel size, mode, cost and verdict;
    the setting's cost, the warning, and the Suggest and All on buttons below.

    ``on_change()`` is called when the user changes a mode (for :meth:`set_modes`, once when all
    are made); ``suggest_samples`` is what Suggest draws per setting (for its tooltip).
    """

    def __init__(self, on_change: Callable[[], None], suggest_samples: int, parent=None) -> None:
        super().__init__(parent)
        box = QGroupBox("Latent levels")
        box.setToolTip("Level 1 is the bottom of the hierarchy (finest detail), the last level "
                       "the top (coarsest). 'px': how many image pixels one latent pixel of the "
                       "level spans. The last column: what switching the level alone costs on "
                       "the preview crop.")
        self.grid = QGridLayout()
        box.setLayout(self.grid)
        self.summary = status_label()
        self.warning = status_label()
        self.warning.setVisible(False)
        self.suggest_btn = QPushButton("Suggest")
        self.suggest_btn.setToolTip(
            "Switch off the bottom 1, 2, ... levels in turn on the preview crop (prior-mean, "
            f"{suggest_samples} samples each) and judge what each removes: an artefact is "
            "independent of the image, real detail is strongest where the image has structure. "
            "Selects the deepest run of bottom levels whose removal looks like an artefact.")
        self.reset_btn = QPushButton("All on")
        self.reset_btn.setToolTip("Set every level back to 'posterior'")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        for w in (box, self.summary, self.warning):
            lay.addWidget(w)
        lay.addLayout(row(self.suggest_btn, self.reset_btn, stretch=True))
        self.boxes: dict[int, QComboBox] = {}
        self.costs: dict[int, QLabel] = {}
        self._on_change = on_change

    def rebuild(self, model) -> None:
        """One row per level of ``model`` (its own setting chosen), or a hint when it is None."""
        while self.grid.count():
            item = self.grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.boxes, self.costs = {}, {}
        self.summary.setText("")
        if model is None:
            self.grid.addWidget(QLabel("No model yet: train or load one."), 0, 0)
            return
        L, defaults = model.levels, model.default_modes()
        for row, lv in enumerate(range(L, 0, -1)):
            where = " (top)" if lv == L else (" (bottom)" if lv == 1 else "")
            name = QLabel(f"Level {lv}{where}")
            name.setToolTip(f"Latent pixels of level {lv} cover {2**lv}x{2**lv} image pixels; "
                            f"switching it off removes structure of about that scale and finer.")
            box = combo(LATENT_MODES, min_chars=8)
            for i, m in enumerate(LATENT_MODES):
                box.setItemData(i, MODE_HELP[m], Qt.ItemDataRole.ToolTipRole)
            box.setCurrentText(defaults[lv - 1])
            if lv in model.config.deactivated_levels:
                items = box.model()
                if isinstance(items, QStandardItemModel):
                    items.item(0).setEnabled(False)
                box.setToolTip("This level was switched off during training: its posterior was "
                               "never trained")
            box.currentTextChanged.connect(lambda *_: self._on_change())
            cost = QLabel("")
            cost.setMinimumWidth(60)
            for col, w in enumerate((name, QLabel(f"{2**lv} px"), box, cost)):
                self.grid.addWidget(w, row, col)
            self.boxes[lv], self.costs[lv] = box, cost

    def modes(self) -> list[str]:
        """Current mode per level, index 0 = level 1."""
        return [self.boxes[lv].currentText() for lv in sorted(self.boxes)]

    def checked(self, model, modes: dict) -> list[str]:
        """Every level's mode once ``modes`` ({level: mode}) are set for ``model``; raises
        InputError for a level it does not have or a mode it cannot take."""
        full = self.modes()
        for lv, m in modes.items():
            if not 1 <= int(lv) <= model.levels:
                raise InputError(
                    f"this model has {model.levels} levels (1..{model.levels}); level {lv} does "
                    "not exist. Settings made for a model with more levels do not apply: set the "
                    "levels of this model")
            full[int(lv) - 1] = m
        return model.resolve_modes(full)

    def set_modes(self, modes: dict) -> None:
        """Set {level: mode} (see :meth:`checked`); ``on_change`` follows once."""
        for box in self.boxes.values():
            box.blockSignals(True)
        for lv, m in modes.items():
            self.boxes[int(lv)].setCurrentText(str(m).replace("_", "-"))
        for box in self.boxes.values():
            box.blockSignals(False)
        self._on_change()

    def show(self, base: list[str], cost_of, report=None, total=None) -> None:
        """Each level's cost (``cost_of(level, mode)``: a LevelCost, or None until a preview has
        computed it) and verdict (from ``report``, the last LevelReport) beside its choice, against
        ``base``, the model's own setting; ``total``: the cost of the whole setting."""
        modes = self.modes()
        for lv, label in self.costs.items():
            mode = modes[lv - 1]
            as_trained = mode == base[lv - 1]  # no cost: the model's own setting
            c = None if as_trained else cost_of(lv, mode)
            v = report.step(lv) if report is not None else None
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
                label.setText(f"−{c.energy:.1%} energy{verdict}")
                label.setToolTip(COST_TIP.format(lv=lv, mode=mode, energy=c.energy, dll=c.dll)
                                 + vtip)
        signal = [lv for lv, m in enumerate(modes, start=1) if m != "posterior"
                  and report is not None and (v := report.step(lv)) is not None
                  and v.verdict == "signal"]
        if signal:
            set_message(self.warning, (
                f"Level{'s' if len(signal) > 1 else ''} {', '.join(map(str, signal))}: what "
                "switching off removes looks like real detail (it is strongest where the image "
                "has structure), not like an artefact: the result may lose real structure. "
                "Suggest picks a safer setting."), error=True)
        self.warning.setVisible(bool(signal))
        if total is not None:
            self.summary.setText(
                f"This setting removes {total.energy:.1%} of the preview's energy; the noisy "
                f"data's log-likelihood changes by {total.dll:+.4f} nats/px (on the preview crop, "
                "against the model's own setting).")
        elif modes == base:
            self.summary.setText("")
