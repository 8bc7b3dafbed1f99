"""Artefact removal: switch latent levels per level, preview live on a crop, apply to the image.

Three kinds of job run through :class:`EngineWidget`: Apply (or Fine-tune) is the main job, with
Run/Stop and the progress bar; the preview and the suggestion run beside it, each in a worker of
its own. The figures shown (the preview, each level's cost, the suggestion) are computed by the
engine (:mod:`napari_hdn.engine.prediction.level_preview`, :mod:`napari_hdn.engine.levels`); a toggle only
re-runs the top-down pass of the cached crop, and a toggle during a preview queues one more with
the newest settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from qtpy.QtWidgets import QGroupBox, QPushButton

from ..engine import InputError, describe_levels, fine_tune, predict_in_rounds
from ..engine.network.multichannel import MultiChannelModel
from ..engine.prediction.level_preview import PreviewCache, Region, crop_key, preview_levels
from ..session import Registry
from ._artefact_forms import VERDICT_TEXT, LevelTable, PreviewSettings, fine_tune_box, row
from ._base import EngineWidget, TaskState
from ._forms import form, rule_range, scroll_body, set_message, spin
from ._inputs import NO_MODEL, LayerChooser, SessionChooser, check_model_fits, chosen_model_and_image
from ._layers import (
    add_or_replace_image,
    add_result_layers,
    axis_labels,
    follow_removals,
    input_limits,
    levels_text,
    output_name,
    remove_layer_soon,
    view_of,
)

#: posterior samples per setting when the widget suggests levels
SUGGEST_SAMPLES = 8
AXES = {2: "YX", 3: "SYX", 4: "STYX"}


@dataclass
class PreviewJob:
    """What a preview was started with."""

    layer: str
    model: str  # the model's name in the session
    region: Region
    modes: list[str]
    key: tuple  # the crop's key in the PreviewCache
    n: int
    seed: int
    axes: str


@dataclass
class SuggestJob:
    """What a suggestion was started with; ``select``: the user asked for it (choose its levels)."""

    model: Any  # the HDNModel described
    layer: str
    region: Region
    select: bool


@dataclass
class ApplyJob:
    """What Apply was started with."""

    layer: str
    model: str
    modes: list[str]
    axes: str
    total: int  # samples


@dataclass
class TuneJob:
    """What Fine-tune was started with."""

    entry: Any  # the session's entry of the model tuned
    layer: str
    levels: list[int]  # the levels withheld
    total: int  # steps


class ArtefactWidget(EngineWidget):
    """Per-level latent control with a live preview, and "Apply" to restore the whole image.

    State flow: a model from the session + an image layer -> one mode control per level (1 =
    bottom, finest) with its cost -> on each change a preview job (cached bottom-up pass of the
    crop, top-down pass with the new modes) -> the layer "HDN preview · <layer>" placed over the
    crop. "Apply" runs the prediction with those modes on the whole layer and adds MMSE/variance
    layers whose name and metadata say which levels were off.
    """

    what = "Apply"
    stopping_text = "Stopping: the samples drawn so far are kept…"

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(napari_viewer, parent)
        self.apply_task = self.task
        self.preview_task = self.add_task("Preview", self._prepare_preview, self._on_preview,
                                          on_start=lambda m: self.show_status("Previewing…"),
                                          interactive=True, latest_wins=True)
        self.suggest_task = self.add_task("Suggest", self._prepare_suggest, self._on_suggest,
                                          on_start=self._on_suggest_start)
        self.cache = PreviewCache()
        self.level_report = None  # the last LevelReport
        self.tuned_entry = None
        self._select = True  # whether the next suggestion chooses its levels
        self._requested_at = 0.0
        self.last_preview_seconds: float | None = None
        self.last_preview: dict | None = None
        self.previews_done = 0
        self.last_layers: list = []

        lay = scroll_body(self)
        box = QGroupBox("Input")
        self.model_combo = SessionChooser(Registry.MODELS)
        self.layer_combo = LayerChooser(napari_viewer)
        box.setLayout(form([("Model", self.model_combo), ("Image layer", self.layer_combo)]))
        lay.addWidget(box)
        self.levels = LevelTable(lambda: self._changed(levels=True), SUGGEST_SAMPLES)
        lay.addWidget(self.levels)
        lv = self.levels
        self.cost_summary, self.warning = lv.summary, lv.warning
        self.suggest_btn, self.reset_btn = lv.suggest_btn, lv.reset_btn
        self.preview_settings = PreviewSettings()
        lay.addWidget(self.preview_settings)
        p = self.preview_settings  # its fields, as the widget's own
        self.region, self.crop_y, self.crop_x, self.crop_size = p.region, p.crop_y, p.crop_x, p.crop_size
        self.preview_side, self.preview_samples, self.seed, self.live = (
            p.preview_side, p.preview_samples, p.seed, p.live)
        self.preview_btn = QPushButton("Preview")
        lay.addLayout(row(self.preview_btn))

        box, self.tune_steps, self.tune_btn = fine_tune_box()
        lay.addWidget(box)
        box = QGroupBox("Apply to the whole layer")
        self.apply_samples = spin(*rule_range("n_samples", most=10000), 50, 10,
                                  "Posterior samples averaged for the MMSE")
        box.setLayout(form([("Samples", self.apply_samples)]))
        lay.addWidget(box)
        self.apply_btn, self.apply_stop = self.run_btn, self.stop_btn
        self.add_run_row(lay, "Apply", progress_format="%v / %m samples",
                         idle_text="Choose a model and an image layer; change a level to preview, "
                         "or press Suggest.")
        lay.addStretch(1)

        self.model_combo.currentIndexChanged.connect(self._rebuild_levels)
        # a new layer choice waits for the next toggle or Preview (layers also change when the
        # viewer closes, and no job may start then)
        self.layer_combo.currentIndexChanged.connect(self.update_controls)
        self.preview_settings.connect(self._changed)
        self.preview_btn.clicked.connect(lambda: self.request_preview())
        self.reset_btn.clicked.connect(self.reset_levels)
        self.suggest_btn.clicked.connect(lambda: self.suggest())
        self.tune_btn.clicked.connect(lambda: self.fine_tune())
        follow_removals(self, napari_viewer, self._on_layer_removed)
        self._rebuild_levels()
        self.set_state(TaskState.IDLE)

    # -- level controls -----------------------------------------------------------------------------
    @property
    def mode_boxes(self) -> dict:
        return self.levels.boxes

    @property
    def cost_labels(self) -> dict:
        return self.levels.costs

    def _model(self):
        e = self.model_combo.current_entry()
        return e.model if e is not None else None

    def _rebuild_levels(self, *_) -> None:
        self.level_report = None
        self.cache.clear()
        self.levels.rebuild(self._model())
        self.update_controls()

    def level_modes(self) -> list[str]:
        """Current mode per level, index 0 = level 1."""
        return self.levels.modes()

    def set_level_mode(self, level: int, mode: str) -> bool:
        """Set one level's mode (as a click would); a notification if it does not exist."""
        return self.set_level_modes({level: mode})

    def set_level_modes(self, modes: dict) -> bool:
        """Set several levels at once ({level: mode}); one preview follows. False if invalid."""
        model = self._model()
        if model is None:
            self.show_error("Artefact removal: no model: train one or load a .hdn file first.")
            return False
        if self.guard("Artefact removal", self.levels.checked, model, modes) is None:
            return False
        self.levels.set_modes(modes)
        return True

    def reset_levels(self) -> None:
        model = self._model()
        if model is not None:
            self.set_level_modes(dict(enumerate(model.default_modes(), start=1)))

    def _changed(self, levels: bool = False) -> None:
        model = self._model()
        if levels:
            self._show_costs()
            if (self.level_report is None and model is not None
                    and self.level_modes() != model.default_modes()):
                self.suggest(select=False)  # verdicts (and warnings) for the levels switched off
        if self.live.isChecked() and model is not None and self.mode_boxes:
            if levels or self.last_preview is not None:
                self.request_preview(quiet=not levels)

    def _show_costs(self, total=None) -> None:
        """Each level's cost and verdict beside its choice; ``total``: the setting's LevelCost."""
        model = self._model()
        base = model.default_modes() if model is not None else []
        job = self.side_tasks["Preview"].meta
        self.levels.show(base, lambda lv, m: job and self.cache.cost(job.key, job.n, job.seed, lv, m),
                         self.level_report, total)

    # -- inputs -------------------------------------------------------------------------------------
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

    def preview_region(self, layer, arr, model) -> Region:
        """The crop to preview: centred on the view (visible region) or the chosen crop."""
        frame, centre, visible = view_of(self.viewer, layer, arr.shape)
        return Region(frame, *self.preview_settings.window(arr.shape, model, centre, visible))

    # -- preview ------------------------------------------------------------------------------------
    def request_preview(self, quiet: bool = False) -> bool:
        """Start a preview now, or after the running one (the newest settings win)."""
        self._requested_at = time.perf_counter()
        return self.start_task("Preview", quiet=quiet)

    def _prepare_preview(self):
        entry, layer, arr, model, modes = self._checked_inputs()
        reg = self.preview_region(layer, arr, model)
        crop = reg.cut(arr)
        n, seed = self.preview_samples.value(), self.seed.value()
        key = crop_key(model, reg, crop)
        reuse = self.cache.reuse(model, key, n, seed)

        def job(report, stop):
            return preview_levels(model, crop, (reg.y0, reg.x0), modes, n, seed, stop_flag=stop,
                                  **reuse)

        return job, PreviewJob(layer.name, entry.name, reg, modes, key, n, seed, AXES[arr.ndim])

    def _on_preview(self, out, job: PreviewJob) -> None:
        if job.layer not in self.viewer.layers:
            self.show_status(f"'{job.layer}' was removed while previewing: the preview was "
                             "discarded. Choose an image layer to preview again.")
        elif out.value is not None:
            self.cache.keep(self._model(), job.key, job.n, job.seed, out.value)
            self._show_preview(job, out.value)
            self._show_costs(out.value.total)
        elif out.stopped:
            self.show_status("Preview stopped.")

    def _show_preview(self, job: PreviewJob, res) -> None:
        layer, reg = self.viewer.layers[job.layer], job.region
        sc, tr = np.asarray(layer.scale, float), np.asarray(layer.translate, float)
        data = res.mmse.reshape((1,) * len(reg.frame) + res.mmse.shape)
        translate = tuple(tr + np.array([*reg.frame, reg.y0, reg.x0], float) * sc)
        off = {lv + 1: m for lv, m in enumerate(job.modes) if m != "posterior"}
        md = {"output": "preview", "source_layer": layer.name, "model": job.model,
              "levels": list(job.modes), "levels_off": off, "n_samples": job.n,
              "frame": list(reg.frame), "origin": [reg.y0, reg.x0]}
        add_or_replace_image(self.viewer, output_name(layer.name, "preview"), data, layer,
                             translate=translate, metadata={"hdn": md},
                             contrast_limits=input_limits(layer, data),
                             labels=axis_labels(job.axes))
        self.last_preview_seconds = time.perf_counter() - self._requested_at
        self.last_preview = {**md, "bottom_up_s": res.bottom_up_s, "top_down_s": res.top_down_s,
                             "cached": res.cached}
        self.previews_done += 1
        what = "cached bottom-up pass" if res.cached else f"bottom-up {res.bottom_up_s:.2f} s"
        costs = f", costs {res.cost_s:.2f} s" if res.cost_s > 0.01 else ""
        setting = levels_text(job.modes) or "all levels on"
        self.show_status(
            f"Preview {reg.h}x{reg.w} at ({reg.y0}, {reg.x0}): {setting}; "
            f"{self.last_preview_seconds:.2f} s ({what}, top-down {res.top_down_s:.2f} s{costs})."
        )

    def _on_layer_removed(self, event) -> None:
        """The preview of a deleted layer goes with it; a preview running on it is stopped."""
        name = getattr(event.value, "name", None)
        if name is None:
            return
        job = self.side_tasks["Preview"].meta
        if self.preview_task.running and job.layer == name:
            self.stop_task("Preview")
        remove_layer_soon(self.viewer, output_name(name, "preview"))
        if job is not None and job.layer == name:
            set_message(self.status, f"'{name}' was removed: its preview was discarded. Choose an "
                        "image layer to preview again.")

    # -- suggestion ---------------------------------------------------------------------------------
    def suggest(self, select: bool = True) -> bool:
        """Describe the levels on the preview crop (in the background) and select the suggestion.

        With ``select=False`` (run by itself the first time a level is switched off) only the
        verdicts beside the levels and the warning are updated; the levels stay as they are.
        """
        self._select = select
        return self.start_task("Suggest", unasked=not select)

    def _prepare_suggest(self):
        entry, layer, arr, model, _ = self._checked_inputs()
        reg = self.preview_region(layer, arr, model)
        crop = reg.cut(arr)
        seed = self.seed.value()

        def job(report, stop):
            return describe_levels(model, crop, n_samples=SUGGEST_SAMPLES, seed=seed,
                                   crop=max(crop.shape), stop_flag=stop)

        return job, SuggestJob(model, layer.name, reg, self._select)

    def _on_suggest_start(self, job: SuggestJob) -> None:
        if job.select:
            self.show_status("Suggest: switching off the bottom levels in turn on the preview "
                             "crop…")

    def _on_suggest(self, out, job: SuggestJob) -> None:
        if out.value is None or self._model() is not job.model:
            if job.select:
                self.show_status("Suggest stopped (or the model changed): no setting was chosen.")
            return
        rep = self.level_report = out.value
        if not job.select:
            self._show_costs()  # verdicts and the warning; the choice stays the user's
            return
        off = rep.levels_off
        self.set_level_modes(dict(enumerate(rep.suggested, start=1)))
        reg = job.region
        self.show_status(
            (f"Suggested: levels {', '.join(map(str, off))} {rep.mode} " if off else
             "Suggested: every level on (no level's removal looks like an artefact) ")
            + f"on the {reg.h}x{reg.w} crop at ({reg.y0}, {reg.x0}). "
            + " ".join(f"Level {st.level}: {VERDICT_TEXT[st.verdict]}." for st in rep.steps)
            # e.g. why a higher level that also looks like an artefact was left on
            + "".join(f" {n[0].upper()}{n[1:]}." for n in rep.notes if off))

    # -- apply and fine-tune (the main job) ---------------------------------------------------------
    def blocker(self) -> str:
        if not self.mode_boxes:
            return NO_MODEL
        if self.layer_combo.current_layer() is None:
            return "choose the image layer to restore"
        return ""

    def apply(self) -> bool:
        """Restore the whole layer with the current level settings (MMSE and variance layers)."""
        return self.start()

    def fine_tune(self) -> bool:
        """Train the model on with the levels that are off withheld; adds the tuned model."""
        return self.start(self._prepare_fine_tune, what="Fine-tuning")

    def on_start(self, meta) -> None:
        self.progress.setRange(0, meta.total)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m steps" if isinstance(meta, TuneJob) else "%v / %m samples")
        self.show_status("Starting…")

    def prepare(self):
        entry, layer, arr, model, modes = self._checked_inputs()
        n, seed, axes = self.apply_samples.value(), self.seed.value(), AXES[arr.ndim]

        def job(report, stop):
            return predict_in_rounds(model, arr, n_samples=n, axes=axes, levels=modes, seed=seed,
                                     callbacks=report, stop_flag=stop)

        return job, ApplyJob(layer.name, entry.name, modes, axes, n)

    def _prepare_fine_tune(self):
        entry, layer, arr, model, modes = self._checked_inputs()
        off = [lv for lv, m in enumerate(modes, start=1)
               if m != "posterior" and lv not in model.config.deactivated_levels]
        if not off:
            raise InputError("switch off the levels to withhold first (or press Suggest): with "
                             "every level as trained there is nothing to fine-tune for")
        steps, axes = self.tune_steps.value(), AXES[arr.ndim]

        def job(report, stop):
            return fine_tune(model, arr, off, steps=steps, axes=axes, callbacks=report,
                             stop_flag=stop, device=str(model.device))

        return job, TuneJob(entry, layer.name, off, steps)

    def on_result(self, out) -> TaskState:
        job = self.meta
        if isinstance(job, TuneJob) and out.value is not None:
            return self._on_tuned(out.value, job)
        if out.value is None:
            self.show_status("Apply stopped before any sample was finished; no layers were changed.")
            return TaskState.STOPPED
        if job.layer not in self.viewer.layers:
            self.show_error(f"Apply: layer '{job.layer}' was removed while computing; results "
                            "not added.")
            return TaskState.FAILED
        off = {lv + 1: m for lv, m in enumerate(job.modes) if m != "posterior"}
        self.last_layers = add_result_layers(
            self.viewer, self.viewer.layers[job.layer], out.value, job.model, job.axes,
            levels_text(job.modes),
            extra={"levels_off": sorted(off), "level_modes": {str(k): v for k, v in off.items()}})
        note = f" {self.warning.text()}" if not self.warning.isHidden() else ""
        self.show_status("Added " + ", ".join(ly.name for ly in self.last_layers if ly.visible)
                         + note)
        return TaskState.STOPPED if out.value.info.get("stopped") else TaskState.DONE

    def _on_tuned(self, tuned, job: TuneJob) -> TaskState:
        entry, layer = job.entry, job.layer
        steps = tuned.info["fine_tuned"]["steps"]
        levels = ",".join(map(str, job.levels))
        # keep the prediction-time preview for comparison, under its own name
        old = output_name(layer, "preview")
        if old in self.viewer.layers:
            self.viewer.layers[old].name = output_name(
                layer, "preview", f"{entry.name} · L{levels} off at prediction")
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

    def update_controls(self, *_) -> None:
        super().update_controls()
        has = bool(self.mode_boxes)
        self.preview_btn.setEnabled(has)
        self.reset_btn.setEnabled(has)
        self.suggest_btn.setEnabled(has and not self.suggest_task.running)
        self.tune_btn.setEnabled(has and not self.busy and not self.blocker())

