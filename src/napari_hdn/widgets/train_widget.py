"""Training widget: train an HDN on an image layer in the background, with live curves, Stop, Resume."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QWidget,
)

from ..engine import (
    DeviceError,
    InputError,
    ModelConfig,
    Trainer,
    TrainingConfig,
    available_devices,
    load_noise_model,
    resolve_device,
)
from ..session import get_session
from ._common import (
    MAX_SEED,
    AxesChooser,
    Collapsible,
    LayerChooser,
    SessionChooser,
    TaskState,
    check_image_layer,
    check_not_blank,
    check_patch_fits,
    combo,
    dspin,
    form,
    notify_error,
    notify_info,
    notify_warning,
    run_guarded,
    scroll_body,
    spin,
    status_label,
)
from ._plot import TrainingPlot
from ._workers import EngineTask, Outcome, user_message

#: Size presets: architecture + the training settings that go with it.
PRESETS: dict[str, dict] = {
    "fast CPU": {
        "model": dict(levels=4, z_dim=16, filters=32, blocks=2, dropout=0.1),
        "training": dict(patch_size=64, batch_size=16, lr=1e-3, max_steps=2000),
    },
    "balanced": {
        "model": dict(levels=5, z_dim=32, filters=48, blocks=3, dropout=0.2),
        "training": dict(patch_size=64, batch_size=32, lr=5e-4, max_steps=10000),
    },
    "paper": {
        "model": dict(levels=6, z_dim=32, filters=64, blocks=5, dropout=0.2),
        "training": dict(patch_size=64, batch_size=64, lr=3e-4, max_steps=20000),
    },
}
CUSTOM = "custom"


@dataclass
class TrainResult:
    model: object
    steps: int
    best_loss: float
    checkpoint_dir: Path
    stopped: bool
    resumed_from: str | None = None


def device_items() -> list[tuple[str, str]]:
    """(label, device name) pairs for the device box; unavailable ones are marked, not hidden."""
    avail = available_devices()
    items = [(f"auto ({avail[0]})", "auto")]
    for name in ("cuda", "mps", "cpu"):
        items.append((name if name in avail else f"{name} (not available here)", name))
    return items


class TrainingWidget(QWidget):
    """Train Hierarchical DivNoising on a noisy image layer.

    State flow: the image layer and a noise model from the session (the Noise model widget or a
    file) -> a :class:`~napari_hdn.engine.Trainer` in a worker thread -> progress events drained by
    a timer into the progress bar and the live plot -> on return the model (the best so far if
    stopped) is registered in the session as "<layer> HDN (N steps)", where the predict and
    artefact-removal widgets pick it up.
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session()
        self.state = TaskState.IDLE
        self.task = EngineTask(self, self._on_events, self._on_finished)
        self._t_start = 0.0
        self._step0 = 0
        self._last_result: TrainResult | None = None
        self._applying_preset = False

        lay = scroll_body(self)
        # -- data ----------------------------------------------------------------------------
        data_box = QGroupBox("Data")
        f = form()
        self.layer_combo = LayerChooser(napari_viewer)
        self.axes_combo = AxesChooser(self.layer_combo)
        nm_row = QHBoxLayout()
        self.noise_combo = SessionChooser("noise")
        self.noise_combo.setToolTip("Noise models from the Noise model widget or loaded from a file")
        self.noise_load = QPushButton("Load…")
        self.noise_load.setToolTip("Load a noise model file (.hdnoise)")
        nm_row.addWidget(self.noise_combo)
        nm_row.addWidget(self.noise_load)
        f.addRow("Image layer", self.layer_combo)
        f.addRow("Axes", self.axes_combo)
        f.addRow("Noise model", nm_row)
        data_box.setLayout(f)
        lay.addWidget(data_box)

        # -- model and training settings -----------------------------------------------------------
        set_box = QGroupBox("Settings")
        f = form()
        self.preset = combo()
        self.preset.addItems([*PRESETS, CUSTOM])
        self.preset.setToolTip(
            "fast CPU: small model, minutes on a laptop CPU; paper: the published architecture "
            "(6 levels, 64 filters, 5 blocks; hours on a GPU)"
        )
        self.size_note = status_label()
        self.patch = spin(16, 512, 64, 8, "Square training patches (pixels); at most the image size")
        self.batch = spin(1, 512, 16, 1, "Patches per optimiser step")
        self.steps = spin(1, 1_000_000, 2000, 100, "Optimiser steps (Resume: additional steps)")
        self.val_fraction = dspin(0.0, 0.5, 0.1, 0.05, 2,
                                  "Fraction of the data held out to measure the validation loss")
        self.device = combo()
        for label, name in device_items():
            self.device.addItem(label, name)
        self.device.setToolTip("Available here: " + ", ".join(available_devices()))
        self.seed = spin(0, MAX_SEED, 0, 1, "Same seed, same training on the same machine")
        f.addRow("Model size", self.preset)
        f.addRow("", self.size_note)
        f.addRow("Patch size", self.patch)
        f.addRow("Batch size", self.batch)
        f.addRow("Steps", self.steps)
        f.addRow("Validation fraction", self.val_fraction)
        f.addRow("Device", self.device)
        f.addRow("Seed", self.seed)
        set_box.setLayout(f)
        lay.addWidget(set_box)

        self.advanced = Collapsible("Advanced")
        f = form()
        self.levels = spin(1, 10, 4, 1, "Latent levels L (each halves the resolution; paper: 6)")
        self.z_dim = spin(1, 512, 16, 1, "Latent channels per level (paper: 32)")
        self.filters = spin(4, 1024, 32, 4, "Feature channels of every block (paper: 64)")
        self.blocks = spin(1, 32, 2, 1, "Residual blocks per level (paper: 5)")
        self.dropout = dspin(0.0, 0.9, 0.1, 0.05, 2, "Dropout in the residual blocks (paper: 0.2)")
        self.free_bits = dspin(0.0, 10.0, 1.0, 0.25, 2, "Free bits per level, nats (paper: 1.0)")
        self.lr = dspin(1e-6, 1.0, 1e-3, 1e-4, 6, "Adamax learning rate (paper: 3e-4)")
        self.steps_per_val = spin(0, 100000, 0, 10, "Steps between validations", special="auto")
        self.patience = spin(0, 10000, 30, 1, "Validations without improvement before stopping",
                             special="off")
        self.deactivated = QLineEdit()
        self.deactivated.setPlaceholderText("e.g. 1,2 (none)")
        self.deactivated.setToolTip(
            "Levels trained without access to the input (the paper's HDN_3-6 for line artefacts). "
            "Usually leave empty and switch levels off at prediction time instead."
        )
        f.addRow("Levels", self.levels)
        f.addRow("Latent channels", self.z_dim)
        f.addRow("Filters", self.filters)
        f.addRow("Blocks per level", self.blocks)
        f.addRow("Dropout", self.dropout)
        f.addRow("Free bits", self.free_bits)
        f.addRow("Learning rate", self.lr)
        f.addRow("Steps per validation", self.steps_per_val)
        f.addRow("Early stopping", self.patience)
        f.addRow("Train with levels off", self.deactivated)
        from ._workers import default_cpu_threads

        self.threads = spin(0, os.cpu_count() or 1, 0, 1,
                            "Torch threads for training, prediction and previews in napari (auto: "
                            "all cores but one, so the viewer stays responsive)",
                            special=f"auto ({default_cpu_threads()})")
        self.threads.valueChanged.connect(self._on_threads)
        f.addRow("CPU threads", self.threads)
        self.advanced.content.setLayout(f)
        lay.addWidget(self.advanced)

        # -- run -------------------------------------------------------------------------------
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setToolTip("Stops within one step; the best model so far is kept")
        row.addWidget(self.train_btn)
        row.addWidget(self.stop_btn)
        lay.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m steps")
        lay.addWidget(self.progress)
        self.status = status_label("Choose an image layer and a noise model, then Train.")
        lay.addWidget(self.status)
        self.plot = TrainingPlot()
        self.show_plot = QCheckBox("Show live plot")
        self.show_plot.setChecked(True)
        self.show_plot.toggled.connect(self.plot.setVisible)
        lay.addWidget(self.show_plot)
        lay.addWidget(self.plot)

        model_box = QGroupBox("Trained model")
        f = form()
        self.model_combo = SessionChooser("models")
        row = QHBoxLayout()
        self.resume_btn = QPushButton("Resume")
        self.resume_btn.setToolTip("Continue training the chosen model for 'Steps' more steps")
        self.save_btn = QPushButton("Save…")
        row.addWidget(self.resume_btn)
        row.addWidget(self.save_btn)
        f.addRow("Model", self.model_combo)
        f.addRow(row)
        model_box.setLayout(f)
        lay.addWidget(model_box)
        lay.addStretch(1)

        # -- wiring ----------------------------------------------------------------------------
        self.preset.currentTextChanged.connect(self._apply_preset)
        for w in (self.levels, self.z_dim, self.filters, self.blocks):
            w.valueChanged.connect(self._on_arch_edited)
        self.dropout.valueChanged.connect(self._on_arch_edited)
        self.train_btn.clicked.connect(self.start_training)
        self.stop_btn.clicked.connect(self.stop_training)
        self.resume_btn.clicked.connect(self.resume_training)
        self.save_btn.clicked.connect(lambda: self.save_model())
        self.noise_load.clicked.connect(lambda: self.load_noise_model())
        self.model_combo.currentIndexChanged.connect(lambda *_: self._update_buttons())
        self._apply_preset("fast CPU")
        self._set_state(TaskState.IDLE)

    # -- presets ------------------------------------------------------------------------------------
    def _apply_preset(self, name: str) -> None:
        if name not in PRESETS:
            self._update_size_note()
            return
        self._applying_preset = True
        p = PRESETS[name]
        m, t = p["model"], p["training"]
        self.levels.setValue(m["levels"])
        self.z_dim.setValue(m["z_dim"])
        self.filters.setValue(m["filters"])
        self.blocks.setValue(m["blocks"])
        self.dropout.setValue(m["dropout"])
        self.patch.setValue(t["patch_size"])
        self.batch.setValue(t["batch_size"])
        self.lr.setValue(t["lr"])
        self.steps.setValue(t["max_steps"])
        self._applying_preset = False
        if self.preset.currentText() != name:
            self.preset.setCurrentText(name)
        self._update_size_note()

    def _on_arch_edited(self, *_) -> None:
        if self._applying_preset:
            return
        cur = self.preset.currentText()
        if cur in PRESETS and self._arch() != {k: v for k, v in PRESETS[cur]["model"].items()}:
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
        n = _parameter_count(a)
        self.size_note.setText(
            f"{a['levels']} levels, {a['filters']} filters, {a['blocks']} blocks/level, "
            f"z={a['z_dim']}: {n / 1e6:.2f} M parameters"
        )

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
        return ModelConfig(**self._arch(), free_bits=self.free_bits.value(),
                           deactivated_levels=levels_off)

    def training_config(self) -> TrainingConfig:
        return TrainingConfig(
            patch_size=self.patch.value(),
            batch_size=self.batch.value(),
            max_steps=self.steps.value(),
            steps_per_epoch=self.steps_per_val.value() or None,
            val_fraction=self.val_fraction.value(),
            lr=self.lr.value(),
            early_stopping_patience=self.patience.value() or None,
            seed=self.seed.value(),
            device=self.device.currentData(),
        )

    def _check_device(self) -> str:
        name = self.device.currentData()
        resolve_device(name)  # raises DeviceError with what is available
        return name

    # -- actions ------------------------------------------------------------------------------------
    def start_training(self) -> bool:
        """Check the inputs and start training in the background. Returns True if it started."""
        if self.task.running:
            notify_warning("Training is already running: stop it first.")
            return False
        job = run_guarded("Training", self._prepare_new)
        if job is None:
            return False
        self._launch(*job)
        return True

    def _prepare_new(self):
        layer = self.layer_combo.current_layer()
        arr = check_image_layer(layer, "image")
        axes = self.axes_combo.axes_for(arr)
        entry = self.noise_combo.current_entry()
        if entry is None:
            raise InputError(
                "no noise model: create one in the Noise model widget (Plugins > Hierarchical "
                "DivNoising > Noise model; e.g. 'known Gaussian' or fit one from a calibration "
                "stack) or load a .hdnoise file with 'Load…'"
            )
        self._check_device()
        mcfg = self.model_config()
        tcfg = self.training_config()
        check_patch_fits(arr, tcfg.patch_size, layer.name)
        check_not_blank(arr, layer.name)
        if tcfg.patch_size % mcfg.downscale:
            notify_info(
                f"Patch size {tcfg.patch_size} is not a multiple of 2^levels = {mcfg.downscale}; "
                "patches are padded (a multiple is slightly faster)."
            )
        ckdir = self.session.new_run(f"'{layer.name}'").directory
        noise = entry.model
        name, layer_name = layer.name, layer.name

        def job(report, stop):
            trainer = Trainer(arr, noise, axes=axes, model_config=mcfg, training_config=tcfg,
                              checkpoint_dir=ckdir, callbacks=report, stop_flag=stop)
            model = trainer.run()
            return TrainResult(model, trainer.step, trainer.best_loss, ckdir,
                               bool(model.info.get("stopped_early")))

        meta = {"layer": layer_name, "axes": axes, "noise": entry.name, "name": name,
                "total": tcfg.max_steps, "step0": 0}
        return job, meta

    def resume_training(self) -> bool:
        """Continue training the model chosen under 'Trained model' for 'Steps' more steps."""
        if self.task.running:
            notify_warning("Training is already running: stop it first.")
            return False
        job = run_guarded("Resume", self._prepare_resume)
        if job is None:
            return False
        self._launch(*job)
        return True

    def _prepare_resume(self):
        entry = self.model_combo.current_entry()
        if entry is None:
            raise InputError("nothing to resume: train a model first (or open a .hdn model file)")
        layer = self.layer_combo.current_layer()
        arr = check_image_layer(layer, "image")
        axes = self.axes_combo.axes_for(arr)
        device = self._check_device()
        model = entry.model
        if self._arch() != {k: getattr(model.config, k) for k in self._arch()}:
            notify_info(
                f"Resuming keeps the architecture of '{entry.name}' ({model.levels} levels, "
                f"{model.config.filters} filters); the size settings apply to new trainings only."
            )
        ckdir = self.session.new_run(f"'{layer.name}' (resumed)", "resume-").directory
        source = entry.checkpoint if entry.checkpoint and entry.checkpoint.exists() else None
        tcfg = None
        if source is None:  # a plain model file: fine-tune with this widget's training settings
            source = entry.path if entry.path and entry.path.exists() else None
            if source is None:
                source = ckdir / "start.hdn"
                model.save(source)
            tcfg = self.training_config()
        step0 = entry.steps
        total = step0 + self.steps.value()
        check_patch_fits(arr, tcfg.patch_size if tcfg else _saved_patch(model), layer.name)
        check_not_blank(arr, layer.name)
        overrides = {"max_steps": total, "device": device}

        def job(report, stop):
            trainer = Trainer(arr, None, axes=axes, training_config=tcfg, checkpoint_dir=ckdir,
                              callbacks=report, stop_flag=stop, resume=source,
                              training_overrides=overrides)
            m = trainer.run()
            return TrainResult(m, trainer.step, trainer.best_loss, ckdir,
                               bool(m.info.get("stopped_early")), resumed_from=entry.name)

        meta = {"layer": layer.name, "axes": axes, "noise": "from model",
                "name": entry.layer_name or layer.name,
                "total": total, "step0": step0}
        return job, meta

    def _launch(self, job, meta: dict) -> None:
        self._meta = meta
        self._t_start = time.perf_counter()
        self._step0 = meta["step0"]
        self.progress.setRange(0, meta["total"])
        self.progress.setValue(meta["step0"])
        self.plot.reset()
        self.status.setText("Starting…")
        self._set_state(TaskState.RUNNING)
        self.task.start(job, name="napari-hdn training")

    def stop_training(self) -> None:
        """Ask training to stop; it ends within one step and keeps the best model so far."""
        if self.task.running:
            self.task.stop()
            self._set_state(TaskState.STOPPING)
            self.status.setText("Stopping after the current step…")

    def save_model(self, path: str | Path | None = None) -> Path | None:
        """Save the model chosen under 'Trained model' (asks for a file name when none is given)."""
        entry = self.model_combo.current_entry()
        if entry is None:
            notify_error("Save: there is no trained model yet: train one first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save HDN model", f"{entry.name}.hdn",
                                                  "HDN model (*.hdn)")
            if not path:
                return None
        path = Path(path)
        if path.suffix != ".hdn":
            path = path.with_suffix(path.suffix + ".hdn") if path.suffix else path.with_suffix(".hdn")
        out = run_guarded("Save", entry.model.save, path)
        if out is None:
            return None
        entry.path = Path(out)
        notify_info(f"Saved '{entry.name}' to {out}")
        return Path(out)

    def load_noise_model(self, path: str | Path | None = None):
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load noise model", "",
                                                  "Noise model (*.hdnoise);;All files (*)")
            if not path:
                return None
        nm = run_guarded("Load noise model", load_noise_model, path)
        if nm is None:
            return None
        return self.session.add_noise_model(nm, Path(path).stem, f"file {path}", path)

    # -- events from the worker (GUI thread) -------------------------------------------------------
    def _on_events(self, events) -> None:
        last = None
        for ev in events:
            if ev.task != "train":
                continue
            if ev.kind == "step":
                self.plot.add_step(ev.step, ev.metrics)
                last = ev
            elif ev.kind == "epoch":
                self.plot.add_epoch(ev.step, ev.metrics)
                last = ev
            elif ev.kind == "start":
                self.progress.setRange(0, max(1, ev.total))
                self.progress.setValue(ev.step)
                self._step0 = ev.step
        if last is not None:
            self.progress.setValue(min(last.step, self.progress.maximum()))
            self.status.setText(self._status_text(last))
        self.plot.redraw()

    def _status_text(self, ev) -> str:
        el = time.perf_counter() - self._t_start
        done = ev.step - self._step0
        rate = done / el if el > 0 else 0.0
        parts = [f"step {ev.step} / {ev.total}"]
        if self.plot.train:
            parts.append(f"loss {self.plot.train[-1]:.4g}")
        if self.plot.val:
            parts.append(f"val {self.plot.val[-1]:.4g}")
        if rate > 0:
            parts.append(f"{rate:.2f} steps/s")
            left = (ev.total - ev.step) / rate
            parts.append(f"about {_duration(left)} left")
        if self.state == TaskState.STOPPING:
            parts.append("stopping…")
        return " · ".join(parts)

    def _on_finished(self, out: Outcome) -> None:
        self.plot.redraw(force=True)
        if not out.ok:
            msg, _ = user_message(out.error, "Training")
            if isinstance(out.error, DeviceError):
                msg += " (choose 'auto' or 'cpu' under Device)"
            notify_error(msg)
            self.status.setText(msg)
            self._set_state(TaskState.FAILED)
            return
        res: TrainResult = out.value
        meta = self._meta
        best = res.best_loss if math.isfinite(res.best_loss) else float("nan")
        name = f"{meta['name']} HDN ({res.steps} steps)"
        src = f"trained on '{meta['layer']}' ({meta['axes']}), noise model {meta['noise']}"
        ck = res.checkpoint_dir / "last.hdn"
        entry = self.session.add_model(res.model, name, src, checkpoint=ck if ck.exists() else None,
                                       layer_name=meta["layer"], axes=meta["axes"])
        self._last_result = res
        el = _duration(time.perf_counter() - self._t_start)
        if res.stopped:
            self._set_state(TaskState.STOPPED)
            text = (f"Stopped at step {res.steps} after {el}; the best model so far "
                    f"(validation loss {best:.4g}) is '{entry.name}'.")
            notify_info(text)
        else:
            self._set_state(TaskState.DONE)
            text = f"Done: {res.steps} steps in {el}; best validation loss {best:.4g}. Model: '{entry.name}'."
        self.status.setText(text + " Use it in Predict and explore or Artefact removal.")

    # -- state --------------------------------------------------------------------------------------
    def _set_state(self, state: TaskState) -> None:
        self.state = state
        self._update_buttons()

    def _update_buttons(self) -> None:
        busy = self.state in (TaskState.RUNNING, TaskState.STOPPING)
        self.train_btn.setEnabled(not busy)
        self.stop_btn.setEnabled(self.state == TaskState.RUNNING)
        has_model = self.model_combo.current_entry() is not None
        self.resume_btn.setEnabled(not busy and has_model)
        self.save_btn.setEnabled(has_model)


def _saved_patch(model) -> int:
    tc = model.info.get("training_config") or {}
    return int(tc.get("patch_size", 8))


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
