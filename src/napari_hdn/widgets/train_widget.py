"""Training widget: train an HDN on an image layer in the background, with live curves, Stop, Resume."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QCheckBox, QGroupBox, QHBoxLayout, QLineEdit, QPushButton

from ..engine import (
    DeviceError,
    EventKind,
    EventTask,
    InputError,
    ModelConfig,
    Trainer,
    TrainingConfig,
    resolve_device,
)
from ..engine.config import MODEL_LIMITS
from ..engine.data.layout import layout_of
from ..engine.network.multichannel import MultiChannelModel, check_channels
from ..engine.noise.channels import ChannelNoiseModels, per_channel_noise
from ..engine.noise.channels import verdict_warnings as verdict_warning
from ..engine.threads import default_job_threads
from ..engine.training.channels import train_channels
from ..engine.training.presets import DEFAULT_PRESET, PRESETS
from ..engine.training.priors import bundled_prior_for
from ..session import Registry
from ._base import EngineWidget, TaskState
from ._forms import (
    MAX_SEED,
    MODEL_FILTER,
    NOISE_FILTER,
    Collapsible,
    ask_open,
    ask_save,
    combo,
    dspin,
    form,
    notify_info,
    notify_warning,
    rule_range,
    scroll_body,
    set_message,
    spin,
    status_label,
)
from ._inputs import (
    AxesChooser,
    LayerChooser,
    SessionChooser,
    check_image_layer,
    check_not_blank,
    check_training_fits,
    chosen_model_and_image,
    device_chooser,
    lazy_layer_data,
)
from ._plot import TrainingPlot

CUSTOM = "custom"
START_PRIOR = "pretrained prior"
PATCH_LABEL, VAL_LABEL = "Patch size", "Validation fraction"
#: the architecture fields the form shows; others in a preset pass through unchanged
ARCH_FIELDS = ("levels", "z_dim", "filters", "blocks", "dropout")


@dataclass
class TrainResult:
    model: object
    steps: int
    best_loss: float
    checkpoint_dir: Path
    stopped: bool


class _RunGuard:
    """Around a training job in the worker: a stop that did not come from this widget's Stop
    button (napari cancelling its tasks as the viewer closes, or the widget going away) marks the
    run as interrupted, so that its checkpoints outlive the session; the run is done either way."""

    def __init__(self, run, stop) -> None:
        self.run, self.stop = run, stop
        run.stop_flag = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.stop.is_set() and not self.run.user_stopped:
            self.run.interrupt("stopped from outside the Training widget: its viewer was closed, "
                               "or the task was cancelled")
        self.run.done.set()


def _training_default(name: str):
    return TrainingConfig.model_fields[name].default


class TrainingWidget(EngineWidget):
    """Train Hierarchical DivNoising on a noisy image layer.

    State flow: the image layer and a noise model from the session (the Noise model widget or a
    file) -> a :class:`~napari_hdn.engine.Trainer` in a worker thread, writing checkpoints to a run
    folder of the session -> progress events drained by a timer into the progress bar and the live
    plot -> on return the model (the best so far if stopped) is registered in the session as
    "<layer> HDN (N steps)", where the predict and artefact-removal widgets pick it up. If the
    widget (or its viewer) closes while training, the run's checkpoints are kept and the next
    Training widget says where they are.
    """

    what = "Training"
    stopping_text = "Stopping after the current step (the best model so far is kept)…"

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(napari_viewer, parent)
        self._applying_preset = False
        self._model_base: dict = {}
        self._training_base: dict = {}
        self._runs: list = []  # runs of this widget; kept on disk if it closes while they train
        self.destroyed.connect(partial(_interrupt_runs, self._runs))

        lay = scroll_body(self)
        # -- data ----------------------------------------------------------------------------
        data_box = QGroupBox("Data")
        self.layer_combo = LayerChooser(napari_viewer)
        self.axes_combo = AxesChooser(self.layer_combo)
        self.noise_combo = SessionChooser(Registry.NOISE_MODELS)
        self.noise_load = QPushButton("Load…")
        self.noise_load.setToolTip("Load a noise model file (.hdnoise)")
        nm_row = QHBoxLayout()
        nm_row.addWidget(self.noise_combo)
        nm_row.addWidget(self.noise_load)
        f = form([("Image layer", self.layer_combo), ("Axes", self.axes_combo)])
        f.addRow("Noise model", nm_row)
        self.noise_note = status_label()  # the warning of a noise model judged suspicious
        self.noise_note.setVisible(False)
        f.addRow(self.noise_note)
        data_box.setLayout(f)
        lay.addWidget(data_box)

        # -- model and training settings -----------------------------------------------------------
        set_box = QGroupBox("Settings")
        self.preset = combo([*PRESETS, CUSTOM], "\n".join(
            f"{name}: {p.description}" for name, p in PRESETS.items()))
        self.size_note = status_label()
        self.patch = spin(*rule_range("patch_size", most=512), 64, 8,
                          "Square training patches (pixels); at most the image size")
        self.batch = spin(*rule_range("batch_size", most=512), 16, 1, "Patches per optimiser step")
        self.steps = spin(*rule_range("max_steps", most=1_000_000), 2000, 100,
                          "Optimiser steps (Resume: additional steps)")
        self.val_fraction = dspin(*rule_range("val_fraction", most=0.5), 0.1, 0.05, 2,
                                  "Fraction of the data held out to measure the validation loss")
        self.device = device_chooser()
        self.seed = spin(*rule_range("seed", most=MAX_SEED), 0, 1,
                         "Same seed, same training on the same machine")
        self.init_combo = combo(
            [(START_PRIOR, "prior"), ("scratch", "scratch")],
            "Pretrained prior: start from the network that ships with napari-hdn, pretrained on "
            "other images (only its weights; the noise model is yours). It reaches a given quality "
            "in far fewer steps. Available for the 'fast CPU' sizes. Scratch: a freshly initialised "
            "network.")
        f = form([("Model size", self.preset), ("", self.size_note), ("Start from", self.init_combo),
                  (PATCH_LABEL, self.patch), ("Batch size", self.batch), ("Steps", self.steps),
                  (VAL_LABEL, self.val_fraction), ("Device", self.device), ("Seed", self.seed)])
        set_box.setLayout(f)
        lay.addWidget(set_box)

        self.advanced = Collapsible("Advanced")
        self.levels = spin(*MODEL_LIMITS["levels"], 4, 1,
                           "Latent levels L (each halves the resolution; paper: 6)")
        self.z_dim = spin(*MODEL_LIMITS["z_dim"], 16, 1, "Latent channels per level (paper: 32)")
        self.filters = spin(*MODEL_LIMITS["filters"], 32, 4, "Feature channels of every block (paper: 64)")
        self.blocks = spin(*MODEL_LIMITS["blocks"], 2, 1, "Residual blocks per level (paper: 5)")
        self.dropout = dspin(0.0, 0.9, 0.1, 0.05, 2, "Dropout in the residual blocks (paper: 0.2)")
        self.free_bits = dspin(0.0, 10.0, 1.0, 0.25, 2, "Free bits per level, nats (paper: 1.0)")
        self.lr = dspin(*rule_range("lr", least=1e-6, most=1.0), 1e-3, 1e-4, 6,
                        "Adamax learning rate (paper: 3e-4)")
        self.steps_per_val = spin(*rule_range("steps_per_epoch", special=True, most=100000), 0, 10,
                                  "Steps between validations", special="auto")
        self.patience = spin(0, 10000, 30, 1, "Validations without improvement before stopping",
                             special="off")
        self.deactivated = QLineEdit()
        self.deactivated.setPlaceholderText("e.g. 1,2 (none)")
        self.deactivated.setToolTip(
            "Levels trained without access to the input (the paper's HDN_3-6 for line artefacts). "
            "Usually leave empty and switch levels off at prediction time instead."
        )
        self.threads = spin(0, os.cpu_count() or 1, 0, 1,
                            "Torch threads for training, prediction and previews in napari (auto: "
                            "all cores but one, so the viewer stays responsive; an artefact "
                            "preview takes every core while nothing else runs)",
                            special=f"auto ({default_job_threads()})")
        self.threads.valueChanged.connect(self._on_threads)
        self.advanced.content.setLayout(form([
            ("Levels", self.levels), ("Latent channels", self.z_dim), ("Filters", self.filters),
            ("Blocks per level", self.blocks), ("Dropout", self.dropout),
            ("Free bits", self.free_bits), ("Learning rate", self.lr),
            ("Steps per validation", self.steps_per_val), ("Early stopping", self.patience),
            ("Train with levels off", self.deactivated), ("CPU threads", self.threads)]))
        lay.addWidget(self.advanced)

        # -- run -------------------------------------------------------------------------------
        self.train_btn = self.run_btn
        self.add_run_row(lay, "Train", progress_format="%v / %m steps",
                         idle_text="Choose an image layer and a noise model, then Train.",
                         stop_tip="Stops within one step; the best model so far is kept")
        self.plot = TrainingPlot()
        self.show_plot = QCheckBox("Show live plot")
        self.show_plot.setChecked(True)
        self.show_plot.toggled.connect(self.plot.setVisible)
        lay.addWidget(self.show_plot)
        lay.addWidget(self.plot)

        model_box = QGroupBox("Trained model")
        self.model_combo = SessionChooser(Registry.MODELS)
        self.resume_btn = QPushButton("Resume")
        self.resume_btn.setToolTip("Continue training the chosen model for 'Steps' more steps")
        self.save_btn = QPushButton("Save…")
        row = QHBoxLayout()
        row.addWidget(self.resume_btn)
        row.addWidget(self.save_btn)
        f = form([("Model", self.model_combo)])
        f.addRow(row)
        model_box.setLayout(f)
        lay.addWidget(model_box)
        lay.addStretch(1)

        # -- wiring ----------------------------------------------------------------------------
        self.preset.currentTextChanged.connect(self._apply_preset)
        for w in (self.levels, self.z_dim, self.filters, self.blocks, self.dropout):
            w.valueChanged.connect(self._on_arch_edited)
        self.resume_btn.clicked.connect(self.resume_training)
        self.save_btn.clicked.connect(lambda: self.save_model())
        self.noise_load.clicked.connect(lambda: self.load_noise_model())
        for w in (self.model_combo, self.noise_combo, self.layer_combo):
            w.currentIndexChanged.connect(self.update_controls)
        self.noise_combo.currentIndexChanged.connect(self._show_noise_note)
        self._show_noise_note()
        self._apply_preset(DEFAULT_PRESET)
        self.set_state(TaskState.IDLE)
        kept = self.session.kept_runs()
        if kept:
            more = f" ({len(kept) - 1} more kept in {kept[0].directory.parent})" if len(kept) > 1 else ""
            self.show_status(kept[0].message() + more)

    def noise_warning(self) -> str:
        """The warning of the chosen noise model when its fit was judged suspicious, else ""."""
        entry = self.noise_combo.current_entry()
        return verdict_warning(entry.model) if entry is not None else ""

    def _show_noise_note(self, *_) -> None:
        text = self.noise_warning()
        set_message(self.noise_note, f"Warning: {text}" if text else "", error=bool(text))
        self.noise_note.setVisible(bool(text))

    # -- presets ------------------------------------------------------------------------------------
    def _apply_preset(self, name: str) -> None:
        """Show a preset's values in the form; its fields without a control are kept as they are."""
        if name not in PRESETS:
            self._update_size_note()
            return
        p = PRESETS[name]
        self._model_base, self._training_base = dict(p.model), dict(p.training)
        t = lambda k: p.training.get(k, _training_default(k))  # noqa: E731
        self._applying_preset = True
        for k in ARCH_FIELDS:
            getattr(self, k).setValue(p.model.get(k, ModelConfig.model_fields[k].default))
        self.free_bits.setValue(p.model.get("free_bits", ModelConfig.model_fields["free_bits"].default))
        self.patch.setValue(t("patch_size"))
        self.batch.setValue(t("batch_size"))
        self.lr.setValue(t("lr"))
        self.steps.setValue(t("max_steps"))
        self.val_fraction.setValue(t("val_fraction"))
        self.steps_per_val.setValue(t("steps_per_epoch") or 0)
        self.patience.setValue(t("early_stopping_patience") or 0)
        self.init_combo.setCurrentIndex(self.init_combo.findData(t("init")))
        self._applying_preset = False
        if self.preset.currentText() != name:
            self.preset.setCurrentText(name)
        self._update_size_note()

    def _on_arch_edited(self, *_) -> None:
        if self._applying_preset:
            return
        cur = self.preset.currentText()
        if cur in PRESETS and self._arch() != {k: PRESETS[cur].model.get(k) for k in ARCH_FIELDS}:
            self.preset.blockSignals(True)
            self.preset.setCurrentText(CUSTOM)
            self.preset.blockSignals(False)
        self._update_size_note()

    def _arch(self) -> dict:
        return dict(levels=self.levels.value(), z_dim=self.z_dim.value(),
                    filters=self.filters.value(), blocks=self.blocks.value(),
                    dropout=round(self.dropout.value(), 4))

    def _update_size_note(self) -> None:
        a = self._arch()
        self.size_note.setText(
            f"{a['levels']} levels, {a['filters']} filters, {a['blocks']} blocks/level, "
            f"z={a['z_dim']}: {_parameter_count(a) / 1e6:.2f} M parameters"
        )
        self._update_start()

    def _update_start(self) -> None:
        """Offer the pretrained prior only for sizes it fits; other sizes start from scratch."""
        fits = bundled_prior_for(ModelConfig(**{**self._model_base, **self._arch()})) is not None
        item = self.init_combo.model().item(self.init_combo.findData("prior"))
        item.setEnabled(fits)
        item.setText(START_PRIOR if fits else f"{START_PRIOR} (only for the 'fast CPU' sizes)")
        if not fits and self.init_combo.currentData() == "prior":
            self.init_combo.setCurrentIndex(self.init_combo.findData("scratch"))

    def _on_threads(self, n: int) -> None:
        self.session.cpu_threads = n or None

    # -- configs ------------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        deact = self.deactivated.text().replace(";", ",").strip()
        try:
            levels_off = [int(v) for v in deact.split(",") if v.strip()]
        except ValueError:
            raise InputError(
                f"'Train with levels off' must be level numbers separated by commas, not {deact!r}"
            ) from None
        return ModelConfig(**{**self._model_base, **self._arch(), "free_bits": self.free_bits.value(),
                              "deactivated_levels": levels_off})

    def training_config(self) -> TrainingConfig:
        """The last preset's training settings with the form's values on top."""
        return TrainingConfig(**{
            **self._training_base,
            "patch_size": self.patch.value(),
            "batch_size": self.batch.value(),
            "max_steps": self.steps.value(),
            "steps_per_epoch": self.steps_per_val.value() or None,
            "val_fraction": self.val_fraction.value(),
            "lr": self.lr.value(),
            "early_stopping_patience": self.patience.value() or None,
            "seed": self.seed.value(),
            "device": self.device.currentData(),
            "init": self.init_combo.currentData(),
        })

    def _check_device(self) -> str:
        name = self.device.currentData()
        resolve_device(name)  # raises DeviceError with what is available
        return name

    # -- actions ------------------------------------------------------------------------------------
    def blocker(self) -> str:
        if self.layer_combo.current_layer() is None:
            return "choose an image layer (open one, or File > Open Sample > Hierarchical DivNoising)"
        if self.noise_combo.current_entry() is None:
            return ("no noise model: make one in the Noise model widget (Plugins > Hierarchical "
                    "DivNoising > Noise model) or Load… a .hdnoise file")
        return ""

    def start_training(self) -> bool:
        """Check the inputs and start training in the background. Returns True if it started."""
        return self.start(self.prepare, "Training")

    def resume_training(self) -> bool:
        """Continue training the model chosen under 'Trained model' for 'Steps' more steps."""
        return self.start(self._prepare_resume, "Resume")

    def stop_training(self) -> None:
        """Ask training to stop; it ends within one step and keeps the best model so far."""
        self.stop()

    def stop(self) -> None:
        for run in self._runs:
            run.user_stopped = True
        super().stop()

    def prepare(self):
        layer = self.layer_combo.current_layer()
        lazy = lazy_layer_data(layer, rgb=True)  # dask, zarr, memory-mapped: read patch by patch
        arr = lazy if lazy is not None else check_image_layer(layer, "image", channels=True)
        axes = self.axes_combo.axes_for(arr)
        lay = layout_of(arr.shape, axes, f"'{layer.name}'")
        entry = self.noise_combo.current_entry()
        if entry is None:
            raise InputError(
                "no noise model: create one in the Noise model widget (Plugins > Hierarchical "
                "DivNoising > Noise model; e.g. 'known Gaussian' or fit one from a calibration "
                "stack) or load a .hdnoise file with 'Load…'"
            )
        self._check_device()
        mcfg, tcfg = self.model_config(), self.training_config()
        frame_shape = arr.shape if not lay.has_channels else tuple(
            v for i, v in enumerate(arr.shape) if i != lay.channel_pos)
        check_training_fits(frame_shape, lay.frame_axes, tcfg.patch_size, tcfg.val_fraction,
                            layer.name, PATCH_LABEL, VAL_LABEL)
        if lazy is None:
            check_not_blank(arr, layer.name)
        noise = entry.model
        if lay.has_channels:
            per_channel_noise(noise, lay.channels)  # a count that does not fit: said now
        elif isinstance(noise, ChannelNoiseModels):
            raise InputError(
                f"'{entry.name}' holds a noise model per channel ({len(noise)}), but '{layer.name}' "
                f"has no channel axis with these Axes ({axes}): choose the Axes with C, or a "
                "noise model of one channel")
        if tcfg.patch_size % mcfg.downscale:
            notify_info(
                f"Patch size {tcfg.patch_size} is not a multiple of 2^levels = {mcfg.downscale}; "
                "patches are padded (a multiple is slightly faster)."
            )
        warning = verdict_warning(entry.model)
        if warning:  # said before the run starts; training goes on (the user chose this model)
            notify_warning(f"Training with '{entry.name}': {warning}")
        run = self._new_run(f"'{layer.name}' ({self.preset.currentText()}, {tcfg.max_steps} steps)")
        names = ["R", "G", "B", "A"][: lay.channels] if layer.rgb else None

        def job(report, stop):
            with _RunGuard(run, stop):
                if lay.has_channels:  # one HDN per channel, one after the other
                    model = train_channels(arr, noise, axes=lay.axes, model_config=mcfg,
                                           training_config=tcfg, checkpoint_dir=run.directory,
                                           callbacks=report, stop_flag=stop, channel_names=names)
                    return TrainResult(model, sum(model.info["steps"]), math.nan, run.directory,
                                       bool(model.info.get("stopped_early")))
                trainer = Trainer(arr, noise, axes=axes, model_config=mcfg, training_config=tcfg,
                                  checkpoint_dir=run.directory, callbacks=report, stop_flag=stop)
                model = trainer.run()
                return TrainResult(model, trainer.step, trainer.best_loss, run.directory,
                                   bool(model.info.get("stopped_early")))

        return job, {"layer": layer.name, "axes": axes, "noise": entry.name, "name": layer.name,
                     "total": tcfg.max_steps, "step0": 0, "curves": None,
                     "channels": lay.channels if lay.has_channels else 0}

    def _prepare_resume(self):
        entry, layer, arr = chosen_model_and_image(
            self.model_combo, self.layer_combo,
            "nothing to resume: train a model first (or open a .hdn model file)", channels=True)
        axes = self.axes_combo.axes_for(arr)
        if isinstance(entry.model, MultiChannelModel):
            return self._prepare_resume_channels(entry, layer, arr, axes)
        device = self._check_device()
        model = entry.model
        if self._arch() != {k: getattr(model.config, k) for k in ARCH_FIELDS}:
            notify_info(
                f"Resuming keeps the architecture of '{entry.name}' ({model.levels} levels, "
                f"{model.config.filters} filters); the size settings apply to new trainings only."
            )
        run = self._new_run(f"'{layer.name}' (resuming '{entry.name}')", "resume-")
        source = entry.checkpoint if entry.checkpoint and entry.checkpoint.exists() else None
        tcfg = None
        if source is None:  # a plain model file: fine-tune with this widget's training settings
            source = entry.path if entry.path and entry.path.exists() else None
            if source is None:
                source = run.directory / "start.hdn"
                model.save(source)
            tcfg = self.training_config()
            check_training_fits(arr.shape, axes, tcfg.patch_size, tcfg.val_fraction, layer.name,
                                PATCH_LABEL, VAL_LABEL)
        else:
            saved = model.info.get("training_config") or {}
            try:
                check_training_fits(arr.shape, axes, int(saved.get("patch_size", 8)),
                                    float(saved.get("val_fraction", 0.0)), layer.name)
            except InputError:
                raise InputError(
                    f"'{layer.name}' is too small for the patch size {saved.get('patch_size')} and "
                    f"validation fraction {saved.get('val_fraction')} '{entry.name}' was trained "
                    "with: resume on a larger image, or train a new model") from None
        check_not_blank(arr, layer.name)
        step0 = entry.steps
        total = step0 + self.steps.value()
        overrides = {"max_steps": total, "device": device}

        def job(report, stop):
            with _RunGuard(run, stop):
                trainer = Trainer(arr, None, axes=axes, training_config=tcfg,
                                  checkpoint_dir=run.directory, callbacks=report, stop_flag=stop,
                                  resume=source, training_overrides=overrides)
                m = trainer.run()
                return TrainResult(m, trainer.step, trainer.best_loss, run.directory,
                                   bool(m.info.get("stopped_early")))

        return job, {"layer": layer.name, "axes": axes, "noise": "from model",
                     "name": entry.layer_name or layer.name, "total": total, "step0": step0,
                     "curves": entry.curves}

    def _prepare_resume_channels(self, entry, layer, arr, axes):
        """Resume of a model per channel: each channel trains on from its checkpoint for
        'Steps' more steps, in the training's checkpoint folder."""
        model = entry.model
        lay = layout_of(arr.shape, axes, f"'{layer.name}'")
        check_channels(model, lay, f"'{layer.name}'")
        folder = entry.checkpoint
        if folder is None or not folder.is_dir():
            raise InputError(
                f"'{entry.name}' has no checkpoint folder here (it was loaded from a file): a "
                "model per channel resumes from the folder of its training; train it again, or "
                "resume it from the command line (napari-hdn train --resume FOLDER)")
        device = self._check_device()
        per = [int(s or 0) for s in model.info.get("steps") or []]
        more = self.steps.value()
        overrides = {"max_steps": max(per or [0]) + more, "device": device}
        run = self.session.new_run(f"'{layer.name}' (resuming '{entry.name}')", "resume-")
        run.directory = folder  # the channels' checkpoints live there
        self._runs[:] = [r for r in self._runs if not r.done.is_set()] + [run]

        def job(report, stop):
            with _RunGuard(run, stop):
                m = train_channels(arr, None, axes=lay.axes, resume=folder, callbacks=report,
                                   stop_flag=stop, training_overrides=overrides,
                                   channel_names=model.info.get("channel_names"))
                return TrainResult(m, sum(m.info["steps"]), math.nan, folder,
                                   bool(m.info.get("stopped_early")))

        return job, {"layer": layer.name, "axes": lay.axes, "noise": "from model",
                     "name": entry.layer_name or layer.name, "total": overrides["max_steps"],
                     "step0": 0, "curves": None, "channels": lay.channels}

    def _new_run(self, label: str, prefix: str = "train-"):
        run = self.session.new_run(label, prefix)
        self._runs[:] = [r for r in self._runs if not r.done.is_set()] + [run]
        return run

    def save_model(self, path: str | Path | None = None) -> Path | None:
        """Save the model chosen under 'Trained model' (asks for a file name when none is given)."""
        entry = self.model_combo.current_entry()
        if entry is None:
            self.show_error("Save: there is no trained model yet: train one first.")
            return None
        path = ask_save(self, "Save HDN model", f"{entry.name}.hdn", MODEL_FILTER, ".hdn", path)
        if path is None or self.guard("Save", entry.model.save, path) is None:
            return None
        entry.path = path
        notify_info(f"Saved '{entry.name}' to {path}")
        return path

    def load_noise_model(self, path: str | Path | None = None):
        path = ask_open(self, "Load noise model", NOISE_FILTER, path)
        return None if path is None else self.guard("Load noise model",
                                                    self.session.open_noise_model_file, path)

    # -- events from the worker (GUI thread) -------------------------------------------------------
    def on_start(self, meta: dict) -> None:
        self.progress.setRange(0, meta["total"])
        self.progress.setValue(meta["step0"])
        self._step0 = meta["step0"]
        if meta["curves"]:
            self.plot.restore(meta["curves"])  # Resume continues the curves of the model
        else:
            self.plot.reset()
        self.show_status("Starting…")

    def _overall(self, ev) -> tuple[int, int]:
        """(steps done, steps planned) of the whole run: with channels, of every channel."""
        n = int(ev.metrics.get("channels") or 1)
        c = int(ev.metrics.get("channel") or 0)
        return c * ev.total + ev.step, n * ev.total

    def on_events(self, events) -> None:
        last = None
        for ev in events:
            if ev.task != EventTask.TRAIN:
                continue
            if ev.kind == EventKind.STEP:
                self.plot.add_step(ev.step, ev.metrics)
                last = ev
            elif ev.kind == EventKind.EPOCH:
                self.plot.add_epoch(ev.step, ev.metrics)
                last = ev
            elif ev.kind == EventKind.START:
                done, total = self._overall(ev)
                if ev.metrics.get("channel"):  # the next channel: its own curves
                    self.plot.reset()
                self.progress.setRange(0, max(1, total))
                self.progress.setValue(done)
                if not ev.metrics.get("channel"):
                    self._step0 = done
        if last is not None:
            self.progress.setValue(min(self._overall(last)[0], self.progress.maximum()))
            self.show_status(self._status_text(last))
        self.plot.redraw()

    def _status_text(self, ev) -> str:
        el = self.elapsed()
        done, total = self._overall(ev)
        rate = (done - self._step0) / el if el > 0 else 0.0
        parts = [f"step {ev.step} / {ev.total}"]
        if ev.metrics.get("channels"):
            parts[0] = f"channel {ev.metrics['channel'] + 1} of {ev.metrics['channels']}, " + parts[0]
        if self.plot.train:
            parts.append(f"loss {self.plot.train[-1]:.4g}")
        if self.plot.val:
            parts.append(f"val {self.plot.val[-1]:.4g}")
        if rate > 0:
            parts.append(f"{rate:.2f} steps/s")
            parts.append(f"about {_duration((total - done) / rate)} left")
        if self.state == TaskState.STOPPING:
            parts.append("stopping…")
        return " · ".join(parts)

    def error_hint(self, exc: BaseException) -> str:
        return " (choose 'auto' or 'cpu' under Device)" if isinstance(exc, DeviceError) else ""

    def on_result(self, out) -> TaskState:
        self.plot.redraw(force=True)
        res: TrainResult = out.value
        meta = self.meta
        if res is None:  # stopped in a channel before the last: no model of every channel
            self.show_status("Stopped before every channel was trained: no model was made (the "
                             "channels trained so far are in the run's checkpoint folder).")
            notify_info("Training stopped before every channel was trained; no model was made.")
            return TaskState.STOPPED
        channels = meta.get("channels") or 0
        # (a run stopped from outside keeps its folder even when its model still arrives here: as
        # the viewer closes, this handler may or may not run before the widget goes)
        best = res.best_loss if math.isfinite(res.best_loss) else float("nan")
        res.model.info["axes"] = meta["axes"]  # saved with the model: Predict defaults to it
        # Resume continues a checkpoint: with channels, the run's folder (one folder a channel)
        ck = res.checkpoint_dir if channels else res.checkpoint_dir / "last.hdn"
        src = f"trained on '{meta['layer']}' ({meta['axes']}), noise model {meta['noise']}"
        first = res.model.models[0] if channels else res.model
        if first.info.get("start", {}).get("init") == "prior":
            src += ", started from the pretrained prior"
        what = f"{channels} channels, {res.steps} steps" if channels else f"{res.steps} steps"
        entry = self.session.add_model(
            res.model, f"{meta['name']} HDN ({what})", src,
            checkpoint=ck if ck.exists() else None, layer_name=meta["layer"], axes=meta["axes"],
            curves=self.plot.snapshot(),
            description=f"{src}; {res.steps} steps, best validation loss {best:.4g}")
        el = _duration(self.elapsed())
        if channels:
            text = (f"{'Stopped in the last channel' if res.stopped else 'Done'}: {channels} "
                    f"channels (one HDN each, {res.steps} steps in all) in {el}. Model: "
                    f"'{entry.name}'.")
            self.show_status(text + " Use it in Predict and explore.")
            return TaskState.STOPPED if res.stopped else TaskState.DONE
        if res.stopped:
            text = (f"Stopped at step {res.steps} after {el}; the best model so far "
                    f"(validation loss {best:.4g}) is '{entry.name}'.")
            notify_info(text)
        else:
            text = f"Done: {res.steps} steps in {el}; best validation loss {best:.4g}. Model: '{entry.name}'."
        self.show_status(text + " Use it in Predict and explore or Artefact removal.")
        return TaskState.STOPPED if res.stopped else TaskState.DONE

    # -- state --------------------------------------------------------------------------------------
    def update_controls(self, *_) -> None:
        super().update_controls()
        has_model = self.model_combo.current_entry() is not None
        self.resume_btn.setEnabled(not self.busy and has_model)
        self.save_btn.setEnabled(has_model)


def _interrupt_runs(runs: list, *_) -> None:
    """The widget is going away (its viewer closed): stop its running training, keep the run."""
    for run in runs:
        if not run.done.is_set():
            run.interrupt("the Training widget or its viewer was closed while training")


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


_PARAM_CACHE: dict[tuple, int] = {}


def _parameter_count(arch: dict) -> int:
    key = tuple(sorted(arch.items()))
    if key not in _PARAM_CACHE:
        from ..engine import LadderVAE

        try:
            net = LadderVAE(ModelConfig(**arch))
            _PARAM_CACHE[key] = sum(p.numel() for p in net.parameters())
        except Exception:  # noqa: BLE001 - invalid combination: the config check reports it later
            _PARAM_CACHE[key] = 0
    return _PARAM_CACHE[key]
