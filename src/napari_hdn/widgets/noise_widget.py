"""Noise model widget: fit (or set) the pixel noise model p(x | s) HDN trains with."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QStackedWidget,
    QWidget,
)

from ..engine import GaussianNoiseModel, InputError, PoissonGaussianNoiseModel, load_noise_model
from ..engine.noise import (
    bootstrap_pairs,
    diagnostics_figure,
    fit_noise_model,
    pairs_from_calibration,
    pairs_from_clean,
    split_pairs,
)
from ..session import get_session
from ._common import (
    MAX_SEED,
    LayerChooser,
    SessionChooser,
    TaskState,
    check_image_layer,
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
from ._plot import FigureCanvas
from ._workers import EngineTask, Outcome, user_message

#: (label shown, key) of the noise-model sources
SOURCES = [
    ("calibration stack", "calibration"),
    ("clean + noisy images", "clean"),
    ("bootstrap: built-in Noise2Void", "n2v"),
    ("bootstrap: pseudo-clean layer", "pseudo"),
    ("known Gaussian sigma", "gaussian"),
    ("known Poisson-Gaussian", "poisson"),
]
KNOWN = ("gaussian", "poisson")
FIGURE_PAIRS = 200_000  # held-out pairs drawn in the diagnostics figure


def _stack_like(layer) -> bool:
    return getattr(layer, "ndim", 2) == 3 and not getattr(layer, "rgb", False)


def _plain_2d(layer) -> bool:
    return getattr(layer, "ndim", 0) == 2


def dock_figure(model, heldout=None):
    """The diagnostics figure sized for the dock: two signal levels (10 % and 90 % quantiles)."""
    if heldout is not None:
        s = np.asarray(heldout[0])
        levels = [float(v) for v in np.quantile(s, [0.1, 0.9])]
        fig = diagnostics_figure(model, *heldout, levels=levels, figsize=(4.2, 4.8))
    else:
        lo, hi = model.signal_range
        fig = diagnostics_figure(model, levels=[lo + 0.1 * (hi - lo), lo + 0.9 * (hi - lo)],
                                 figsize=(4.2, 4.8))
    info = getattr(model, "info", {}) or {}
    fig.suptitle(f"{model.kind} noise model: {info.get('verdict', 'fitted')}", fontsize=9)
    return fig


class NoiseModelWidget(QWidget):
    """Fit a GMM or histogram noise model, or set a known Gaussian / Poisson-Gaussian one.

    State flow: source and layers -> pixel pairs (calibration stack, clean + noisy, or bootstrap
    from the noisy layer with the built-in Noise2Void or a pseudo-clean layer) -> fit in a worker
    (progress per step, Stop keeps the best so far) -> diagnostics figure and verdict shown here
    -> the noise model is registered in the session, where the Training widget selects it.
    """

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session()
        self.state = TaskState.IDLE
        self.task = EngineTask(self, self._on_events, self._on_finished)
        self.canvas: FigureCanvas | None = None
        self.last_entry = None
        self._figure_entry = None
        self._pending_fig = None
        self._large_dock = None

        lay = scroll_body(self)
        box = QGroupBox("Source")
        f = form()
        self.source = combo()
        for label, key in SOURCES:
            self.source.addItem(label, key)
        self.source.setToolTip(
            "calibration stack: many noisy frames of a static sample (best); clean + noisy: a "
            "clean image and noisy acquisitions of it; bootstrap: no calibration data, a denoised "
            "version of the noisy data stands in for the signal; known: give the camera's noise "
            "parameters"
        )
        f.addRow("Source", self.source)
        self.pages = QStackedWidget()
        # calibration
        p, pf = QWidget(), form()
        self.calib_layer = LayerChooser(napari_viewer, prefer=_stack_like)
        pf.addRow("Stack (N, Y, X)", self.calib_layer)
        p.setLayout(pf)
        self.pages.addWidget(p)
        # clean + noisy
        p, pf = QWidget(), form()
        self.clean_layer = LayerChooser(napari_viewer, prefer=lambda ly: "truth" in ly.name
                                        or "clean" in ly.name)
        self.clean_noisy_layer = LayerChooser(napari_viewer, prefer=_plain_2d)
        pf.addRow("Clean", self.clean_layer)
        pf.addRow("Noisy", self.clean_noisy_layer)
        p.setLayout(pf)
        self.pages.addWidget(p)
        # bootstrap n2v
        p, pf = QWidget(), form()
        self.n2v_layer = LayerChooser(napari_viewer, prefer=lambda ly: "truth" not in ly.name)
        self.n2v_steps = spin(10, 100000, 1500, 100, "Noise2Void training steps")
        self.n2v_budget = spin(0, 36000, 120, 10, "Stop Noise2Void training after this many "
                               "seconds (0: no limit)", special="no limit")
        pf.addRow("Noisy", self.n2v_layer)
        pf.addRow("N2V steps", self.n2v_steps)
        pf.addRow("N2V time limit (s)", self.n2v_budget)
        p.setLayout(pf)
        self.pages.addWidget(p)
        # bootstrap pseudo-clean
        p, pf = QWidget(), form()
        self.pseudo_noisy_layer = LayerChooser(napari_viewer, prefer=lambda ly: "truth" not in ly.name)
        self.pseudo_layer = LayerChooser(napari_viewer, prefer=lambda ly: "MMSE" in ly.name)
        pf.addRow("Noisy", self.pseudo_noisy_layer)
        pf.addRow("Pseudo-clean", self.pseudo_layer)
        p.setLayout(pf)
        self.pages.addWidget(p)
        # known Gaussian
        p, pf = QWidget(), form()
        self.sigma = dspin(1e-6, 1e9, 10.0, 1.0, 4, "Standard deviation of the noise, in the "
                           "image's intensity units")
        pf.addRow("Sigma", self.sigma)
        p.setLayout(pf)
        self.pages.addWidget(p)
        # known Poisson-Gaussian
        p, pf = QWidget(), form()
        self.gain = dspin(1e-6, 1e6, 1.0, 0.1, 4, "Intensity units per photon (ADU/e-)")
        self.read_noise = dspin(0.0, 1e6, 2.0, 0.5, 4, "Camera read noise std (intensity units)")
        self.offset = dspin(-1e9, 1e9, 100.0, 10.0, 3, "Camera offset (intensity of zero photons)")
        pf.addRow("Gain", self.gain)
        pf.addRow("Read noise", self.read_noise)
        pf.addRow("Offset", self.offset)
        p.setLayout(pf)
        self.pages.addWidget(p)
        f.addRow(self.pages)
        box.setLayout(f)
        lay.addWidget(box)

        self.fit_box = QGroupBox("Model")
        f = form()
        self.kind = combo()
        self.kind.addItem("GMM", "gmm")
        self.kind.addItem("histogram", "histogram")
        self.kind.setToolTip("GMM: a mixture of Gaussians whose parameters vary smoothly with the "
                             "signal (compact, smooth); histogram: the empirical distribution per "
                             "signal bin (needs more data)")
        self.n_gaussians = spin(1, 10, 3, 1, "Gaussians in the mixture")
        self.degree = spin(1, 5, 1, 1, "Polynomial degree of the parameters in the signal")
        self.val_fraction = dspin(0.01, 0.5, 0.1, 0.05, 2, "Pairs held out for the held-out "
                                  "likelihood and the diagnostics")
        self.fit_seed = spin(0, MAX_SEED, 0, 1, "Seeds the held-out split (and Noise2Void)")
        f.addRow("Kind", self.kind)
        f.addRow("Gaussians", self.n_gaussians)
        f.addRow("Degree", self.degree)
        f.addRow("Held-out fraction", self.val_fraction)
        f.addRow("Seed", self.fit_seed)
        self.fit_box.setLayout(f)
        lay.addWidget(self.fit_box)

        row = QHBoxLayout()
        self.fit_btn = QPushButton("Fit")
        self.stop_btn = QPushButton("Stop")
        row.addWidget(self.fit_btn)
        row.addWidget(self.stop_btn)
        lay.addLayout(row)
        self.progress = QProgressBar()
        lay.addWidget(self.progress)
        self.status = status_label("Choose a source, then Fit.")
        lay.addWidget(self.status)

        box = QGroupBox("Result")
        f = form()
        self.model_combo = SessionChooser("noise")
        row = QHBoxLayout()
        self.save_btn = QPushButton("Save…")
        self.load_btn = QPushButton("Load…")
        row.addWidget(self.save_btn)
        row.addWidget(self.load_btn)
        f.addRow("Noise model", self.model_combo)
        f.addRow(row)
        self.verdict = status_label()
        f.addRow(self.verdict)
        self.large_btn = QPushButton("Large figure")
        self.large_btn.setToolTip("The diagnostics at four signal levels, docked below the canvas")
        f.addRow(self.large_btn)
        box.setLayout(f)
        self.result_layout = f
        lay.addWidget(box)
        lay.addStretch(1)

        self.source.currentIndexChanged.connect(self._on_source)
        self.kind.currentIndexChanged.connect(self._on_kind)
        self.fit_btn.clicked.connect(self.fit)
        self.stop_btn.clicked.connect(self.stop)
        self.save_btn.clicked.connect(lambda: self.save_noise_model())
        self.load_btn.clicked.connect(lambda: self.load_noise_model())
        self.model_combo.currentIndexChanged.connect(self._show_entry)
        self.large_btn.clicked.connect(lambda: self.show_large_figure())
        self._on_source()
        self._on_kind()
        self._set_state(TaskState.IDLE)
        self._show_entry()

    # -- ui ------------------------------------------------------------------------------------------
    def source_key(self) -> str:
        return self.source.currentData()

    def set_source(self, key: str) -> None:
        idx = self.source.findData(key)
        if idx < 0:
            raise ValueError(f"unknown source {key!r}; one of {[k for _, k in SOURCES]}")
        self.source.setCurrentIndex(idx)

    def _on_source(self, *_) -> None:
        idx = self.source.currentIndex()
        for i in range(self.pages.count()):  # the stack takes the height of the shown page only
            pol = QSizePolicy.Policy.Preferred if i == idx else QSizePolicy.Policy.Ignored
            self.pages.widget(i).setSizePolicy(pol, pol)
        self.pages.setCurrentIndex(idx)
        self.pages.adjustSize()
        known = self.source_key() in KNOWN
        self.fit_box.setVisible(not known)
        self.fit_btn.setText("Use" if known else "Fit")
        self.fit_btn.setToolTip("Create this noise model and make it available for training"
                                if known else "Fit the noise model in the background")

    def _on_kind(self, *_) -> None:
        gmm = self.kind.currentData() == "gmm"
        self.n_gaussians.setEnabled(gmm)
        self.degree.setEnabled(gmm)

    # -- actions ------------------------------------------------------------------------------------
    def fit(self) -> bool:
        """Fit (or, for known models, create) the noise model of the chosen source."""
        if self.task.running:
            notify_warning("A noise-model fit is already running.")
            return False
        key = self.source_key()
        if key in KNOWN:
            return run_guarded("Noise model", self._make_known) is not None
        prep = run_guarded("Noise-model fit", self._prepare_fit)
        if prep is None:
            return False
        job, meta = prep
        self._meta = meta
        self._t0 = time.perf_counter()
        self.progress.setRange(0, 0)  # busy until the first event gives a total
        self.status.setText("Preparing pairs…")
        self._set_state(TaskState.RUNNING)
        self.task.start(job, name="napari-hdn noise fit")
        return True

    def _make_known(self):
        if self.source_key() == "gaussian":
            nm = GaussianNoiseModel(self.sigma.value())
            name = f"Gaussian sigma {self.sigma.value():g}"
        else:
            nm = PoissonGaussianNoiseModel(self.gain.value(), self.read_noise.value(),
                                           self.offset.value())
            name = (f"Poisson-Gaussian gain {self.gain.value():g}, read noise "
                    f"{self.read_noise.value():g}, offset {self.offset.value():g}")
        entry = self.session.add_noise_model(nm, name, "known parameters")
        self.last_entry = entry
        self.status.setText(f"'{entry.name}' is ready for training.")
        return entry

    def _prepare_fit(self):
        key = self.source_key()
        kind = self.kind.currentData()
        opts = dict(n_gaussians=self.n_gaussians.value(), degree=self.degree.value()) \
            if kind == "gmm" else {}
        vf, seed = self.val_fraction.value(), self.fit_seed.value()
        if key == "calibration":
            layer = self.calib_layer.current_layer()
            stack = check_image_layer(layer, "calibration stack")
            if stack.ndim != 3:
                raise InputError(
                    f"'{layer.name}' has shape {stack.shape}: a calibration stack is a 3D layer "
                    "(N, Y, X) of many noisy frames of a static sample"
                )
            label = f"'{layer.name}' (calibration)"

            def make_pairs(report, stop):
                return pairs_from_calibration(stack)
        elif key == "clean":
            clayer, nlayer = self.clean_layer.current_layer(), self.clean_noisy_layer.current_layer()
            clean = check_image_layer(clayer, "clean")
            noisy = check_image_layer(nlayer, "noisy")
            if clayer.name == nlayer.name:
                raise InputError("choose two different layers: the clean image and the noisy one")
            label = f"'{clayer.name}' + '{nlayer.name}'"

            def make_pairs(report, stop):
                return pairs_from_clean(clean, noisy)
        elif key == "n2v":
            layer = self.n2v_layer.current_layer()
            noisy = check_image_layer(layer, "noisy")
            if noisy.ndim > 3:
                raise InputError(f"'{layer.name}' is {noisy.ndim}D: bootstrapping takes a 2D image "
                                 "or a stack of frames (3D)")
            n2v = {"max_steps": self.n2v_steps.value()}
            if self.n2v_budget.value():
                n2v["time_budget_s"] = float(self.n2v_budget.value())
            label = f"'{layer.name}' (bootstrap, Noise2Void)"

            def make_pairs(report, stop):
                return bootstrap_pairs(noisy, None, n2v=n2v, seed=seed, callbacks=report,
                                       stop_flag=stop)
        else:
            nlayer, player = self.pseudo_noisy_layer.current_layer(), self.pseudo_layer.current_layer()
            noisy = check_image_layer(nlayer, "noisy")
            pseudo = check_image_layer(player, "pseudo-clean")
            if nlayer.name == player.name:
                raise InputError("choose two different layers: the noisy image and its denoised "
                                 "(pseudo-clean) version")
            if noisy.shape != pseudo.shape:
                raise InputError(f"'{nlayer.name}' {noisy.shape} and '{player.name}' "
                                 f"{pseudo.shape} must have the same shape")
            label = f"'{nlayer.name}' (bootstrap, pseudo-clean '{player.name}')"

            def make_pairs(report, stop):
                return bootstrap_pairs(noisy, pseudo)

        def job(report, stop):
            pairs = make_pairs(report, stop)
            if stop.is_set():
                return None
            nm = fit_noise_model(pairs, kind=kind, val_fraction=vf, seed=seed, callbacks=report,
                                 stop_flag=stop, **opts)
            _, held = split_pairs(pairs, vf, seed)
            ev = held if held is not None else pairs
            s, x = ev.signal, ev.observation
            if s.size > FIGURE_PAIRS:
                pick = np.random.default_rng(seed).choice(s.size, FIGURE_PAIRS, replace=False)
                s, x = s[pick], x[pick]
            fig = dock_figure(nm, (s, x))
            return nm, fig, (s, x)

        names = {"gmm": "GMM", "histogram": "histogram"}
        return job, {"label": label, "name": f"{names[kind]} from {label}"}

    def stop(self) -> None:
        if self.task.running:
            self.task.stop()
            self._set_state(TaskState.STOPPING)
            self.status.setText("Stopping (the best fit so far is kept)…")

    def save_noise_model(self, path: str | Path | None = None) -> Path | None:
        entry = self.model_combo.current_entry()
        if entry is None:
            notify_error("Save: there is no noise model yet: fit or create one first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save noise model", f"{entry.name}.hdnoise",
                                                  "Noise model (*.hdnoise)")
            if not path:
                return None
        path = Path(path)
        if path.suffix != ".hdnoise":
            path = path.with_name(path.name + ".hdnoise")
        if run_guarded("Save noise model", lambda: entry.model.save(path) or True) is None:
            return None
        entry.path = path
        notify_info(f"Saved noise model '{entry.name}' to {path}")
        return path

    def load_noise_model(self, path: str | Path | None = None):
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load noise model", "",
                                                  "Noise model (*.hdnoise);;All files (*)")
            if not path:
                return None
        nm = run_guarded("Load noise model", load_noise_model, path)
        if nm is None:
            return None
        entry = self.session.add_noise_model(nm, Path(path).stem, f"file {path}", path)
        self.last_entry = entry
        return entry

    # -- worker events (GUI thread) ----------------------------------------------------------------
    def _on_events(self, events) -> None:
        last = events[-1]
        if last.total:
            self.progress.setRange(0, last.total)
            self.progress.setValue(min(last.step, last.total))
        m = last.metrics
        if last.task == "n2v":
            text = f"Noise2Void (pseudo-clean image): step {last.step} / {last.total}"
            if m.get("val_loss") is not None:
                text += f", val loss {m['val_loss']:.4g}"
        else:
            text = f"Fitting: iteration {last.step} / {last.total}"
            if m.get("val_nll") is not None:
                text += f", held-out NLL {m['val_nll']:.4f} nats/px"
        self.status.setText(text)

    def _on_finished(self, out: Outcome) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        if not out.ok:
            msg, _ = user_message(out.error, "Noise-model fit")
            notify_error(msg)
            self.status.setText(msg)
            self._set_state(TaskState.FAILED)
            return
        if out.value is None:
            self.status.setText("Stopped before fitting started; no noise model was made.")
            self._set_state(TaskState.STOPPED)
            return
        nm, fig, held = out.value
        self._pending_fig = fig  # shown by _show_entry when the session announces the new model
        entry = self.session.add_noise_model(nm, self._meta["name"], f"fitted on {self._meta['label']}",
                                             heldout=held)
        self._pending_fig = None
        self.last_entry = entry
        self._set_state(TaskState.STOPPED if out.stopped else TaskState.DONE)
        el = time.perf_counter() - self._t0
        self.status.setText(f"{'Stopped' if out.stopped else 'Fitted'} in {el:.1f} s: "
                            f"'{entry.name}' is ready for training.")

    def _show_entry(self, *_) -> None:
        entry = self.model_combo.current_entry()
        if entry is None:
            self.verdict.setText("")
            return
        info = getattr(entry.model, "info", None) or {}
        verdict = info.get("verdict")
        if verdict is None:
            self.verdict.setText(f"<b>{entry.name}</b>: known parameters ({entry.model!r}); no fit, "
                                 "no diagnostics.")
            if self.canvas is not None:
                self.canvas.setVisible(False)
            return
        colour = "#5c5" if verdict == "good" else "#e93"
        nll = info.get("heldout_nll")
        hist = info.get("heldout_nll_histogram")
        text = f"Verdict: <b style='color:{colour}'>{verdict}</b>"
        if nll is not None:
            text += f" · held-out NLL {nll:.4f} nats/px"
            if hist is not None:
                text += f" (histogram model {hist:.4f})"
        reasons = info.get("reasons") or []
        if reasons:
            text += "<ul>" + "".join(f"<li>{r}</li>" for r in reasons) + "</ul>"
        self.verdict.setText(text)
        if self._pending_fig is not None:
            self._show_figure(self._pending_fig, entry)
            self._pending_fig = None
        elif entry is not self._figure_entry or self.canvas is None:
            fig = run_guarded("Diagnostics", self._figure_for, entry)
            if fig is not None:
                self._show_figure(fig, entry)
        else:
            self.canvas.setVisible(True)

    @staticmethod
    def _figure_for(entry):
        return dock_figure(entry.model, entry.heldout)

    def show_large_figure(self):
        """The full diagnostics figure (four signal levels) in a dock at the bottom of the window.

        A dock rather than a separate window: it stays with the viewer, and (measured under Xvfb
        with software OpenGL) a separate top-level window followed by a change of the viewer's
        dimensions crashed the OpenGL canvas.
        """
        entry = self.model_combo.current_entry()
        if entry is None or not (getattr(entry.model, "info", None) or {}).get("verdict"):
            notify_warning("No fitted noise model to show: fit one (or load a fitted .hdnoise).")
            return None
        pairs = entry.heldout or ()
        fig = run_guarded("Diagnostics", diagnostics_figure, entry.model, *pairs, figsize=(11, 5.5))
        if fig is None:
            return None
        if self._large_dock is not None:
            try:
                self.viewer.window.remove_dock_widget(self._large_dock)
            except (RuntimeError, LookupError, ValueError):  # already closed by the user
                pass
        canvas = FigureCanvas(fig, height=420)
        self._large_dock = self.viewer.window.add_dock_widget(
            canvas, name="Noise model diagnostics", area="bottom")
        return canvas

    def _show_figure(self, fig, entry) -> None:
        if self.canvas is not None:
            self.result_layout.removeRow(self.canvas)
            self.canvas = None
        self._figure_entry = entry
        self.canvas = FigureCanvas(fig, height=440)
        self.result_layout.addRow(self.canvas)
        self.canvas.draw_idle()

    # -- state --------------------------------------------------------------------------------------
    def _set_state(self, state: TaskState) -> None:
        self.state = state
        busy = state in (TaskState.RUNNING, TaskState.STOPPING)
        self.fit_btn.setEnabled(not busy)
        self.stop_btn.setEnabled(state == TaskState.RUNNING)
        self.load_btn.setEnabled(not busy)
