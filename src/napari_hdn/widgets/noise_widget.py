"""Noise model widget: fit (or set) the pixel noise model p(x | s) HDN trains with."""

from __future__ import annotations

import html

import numpy as np
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QPushButton, QSizePolicy, QStackedWidget, QWidget

from ..engine import EventKind, EventTask, GaussianNoiseModel, InputError, PoissonGaussianNoiseModel
from ..engine.data.layout import layout_of
from ..engine.noise import (
    bootstrap_pairs,
    diagnostics_figure,
    fit_noise_model,
    pairs_from_calibration,
    pairs_from_clean,
    split_pairs,
)
from ..engine.noise.channels import ChannelNoiseModels
from ..session import Registry
from ._base import EngineWidget, TaskState
from ._forms import (
    MAX_SEED,
    NOISE_FILTER,
    ask_open,
    ask_save,
    combo,
    dspin,
    form,
    notify_info,
    notify_warning,
    rule_range,
    scroll_body,
    spin,
    status_label,
)
from ._inputs import AxesChooser, LayerChooser, SessionChooser, check_image_layer
from ._plot import FigureCanvas

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
KIND_TEXT = {"gmm": "GMM", "histogram": "histogram"}


def _stack_like(layer) -> bool:
    return getattr(layer, "ndim", 2) == 3 and not getattr(layer, "rgb", False)


def _plain_2d(layer) -> bool:
    return getattr(layer, "ndim", 0) == 2


def _heldout(pairs, val_fraction: float, seed: int):
    """The held-out pairs of a fit (at most FIGURE_PAIRS of them), for its diagnostics figure."""
    _, held = split_pairs(pairs, val_fraction, seed)
    ev = held if held is not None else pairs
    s, x = ev.signal, ev.observation
    if s.size > FIGURE_PAIRS:
        pick = np.random.default_rng(seed).choice(s.size, FIGURE_PAIRS, replace=False)
        s, x = s[pick], x[pick]
    return s, x


def dock_figure(model, heldout=None, title: str = ""):
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
    what = f"{title}: " if title else ""
    fig.suptitle(f"{what}{model.kind} noise model: {info.get('verdict', 'fitted')}", fontsize=9)
    return fig


def fit_name(kind: str, settings: dict, source: str) -> str:
    """Short name: kind and settings first (what tells two fits apart), then the source."""
    what = KIND_TEXT[kind]
    if kind == "gmm":
        what += f" k={settings['n_gaussians']} d={settings['degree']}"
    return f"{what} · {source}"


def fit_description(kind: str, settings: dict, source_text: str, model) -> str:
    """The full text of a fitted model (the tooltip in the model lists)."""
    parts = [f"{KIND_TEXT[kind]} noise model"]
    if kind == "gmm":
        parts.append(f"{settings['n_gaussians']} Gaussians, polynomial degree {settings['degree']}")
    parts.append(f"held-out fraction {settings['val_fraction']:g}, seed {settings['seed']}")
    text = f"{parts[0]} ({', '.join(parts[1:])}) fitted on {source_text}"
    info = getattr(model, "info", {}) or {}
    if info.get("verdict"):
        text += f"; verdict {info['verdict']}"
    if info.get("heldout_nll") is not None:
        text += f", held-out NLL {info['heldout_nll']:.4f} nats/px"
    return text


class NoiseModelWidget(EngineWidget):
    """Fit a GMM or histogram noise model, or set a known Gaussian / Poisson-Gaussian one.

    State flow: source and layers -> pixel pairs (calibration stack, clean + noisy, or bootstrap
    from the noisy layer with the built-in Noise2Void or a pseudo-clean layer) -> fit in a worker
    (progress per step, Stop keeps the best so far) -> diagnostics figure and verdict, with the
    reasons or the checks behind it, shown here -> the noise model is registered in the session,
    where the Training widget selects it.
    """

    what = "Noise-model fit"
    stopping_text = "Stopping (the best fit so far is kept)…"

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(napari_viewer, parent)
        self.canvas: FigureCanvas | None = None
        self.last_entry = None
        self._figure_entry = None
        self._pending_fig = None
        self._large_dock = None

        lay = scroll_body(self)
        box = QGroupBox("Source")
        self.source = combo(SOURCES, (
            "calibration stack: many noisy frames of a static sample (best); clean + noisy: a "
            "clean image and noisy acquisitions of it; bootstrap: no calibration data, a denoised "
            "version of the noisy data stands in for the signal; known: give the camera's noise "
            "parameters"))
        self.pages = QStackedWidget()
        self.calib_layer = LayerChooser(napari_viewer, prefer=_stack_like)
        self.clean_layer = LayerChooser(napari_viewer, prefer=lambda ly: "truth" in ly.name
                                        or "clean" in ly.name)
        self.clean_noisy_layer = LayerChooser(napari_viewer, prefer=_plain_2d)
        self.n2v_layer = LayerChooser(napari_viewer, prefer=lambda ly: "truth" not in ly.name)
        self.n2v_axes = AxesChooser(self.n2v_layer)  # with C: a noise model per channel
        self.n2v_steps = spin(*rule_range("n2v_steps", special=True, most=100000), 0, 100,
                              "At most this many Noise2Void training steps (auto: until its "
                              "validation loss levels off, at most 4000; "
                              "the same on a busy machine, only slower). A run cut short by a "
                              "limit makes the verdict suspicious", special="auto (until converged)")
        self.n2v_budget = spin(0, 36000, 0, 10, "Stop Noise2Void training after this many "
                               "seconds (0: no limit). A limit makes the result depend on how busy "
                               "the machine is; a run it cuts short makes the verdict suspicious",
                               special="no limit")
        self.pseudo_noisy_layer = LayerChooser(napari_viewer, prefer=lambda ly: "truth" not in ly.name)
        self.pseudo_layer = LayerChooser(napari_viewer, prefer=lambda ly: "MMSE" in ly.name)
        self.sigma = dspin(*rule_range("sigma", least=1e-6, most=1e9), 10.0, 1.0, 4,
                           "Standard deviation of the noise, in the image's intensity units")
        self.gain = dspin(*rule_range("gain", least=1e-6, most=1e6), 1.0, 0.1, 4,
                          "Intensity units per photon (ADU/e-)")
        self.read_noise = dspin(*rule_range("read_noise", most=1e6), 2.0, 0.5, 4,
                                "Camera read noise std (intensity units)")
        self.offset = dspin(*rule_range("offset", least=-1e9, most=1e9), 100.0, 10.0, 3,
                            "Camera offset (intensity of zero photons)")
        for rows in ([("Stack (N, Y, X)", self.calib_layer)],
                     [("Clean", self.clean_layer), ("Noisy", self.clean_noisy_layer)],
                     [("Noisy", self.n2v_layer), ("Axes", self.n2v_axes),
                      ("N2V steps", self.n2v_steps), ("N2V time limit (s)", self.n2v_budget)],
                     [("Noisy", self.pseudo_noisy_layer), ("Pseudo-clean", self.pseudo_layer)],
                     [("Sigma", self.sigma)],
                     [("Gain", self.gain), ("Read noise", self.read_noise), ("Offset", self.offset)]):
            page = QWidget()
            page.setLayout(form(rows))
            self.pages.addWidget(page)
        f = form([("Source", self.source)])
        f.addRow(self.pages)
        box.setLayout(f)
        lay.addWidget(box)

        self.fit_box = QGroupBox("Model")
        self.kind = combo([("GMM", "gmm"), ("histogram", "histogram")],
                          "GMM: a mixture of Gaussians whose parameters vary smoothly with the "
                          "signal (compact, smooth); histogram: the empirical distribution per "
                          "signal bin (needs more data)")
        self.n_gaussians = spin(*rule_range("n_gaussians"), 3, 1, "Gaussians in the mixture")
        self.degree = spin(*rule_range("degree"), 1, 1,
                           "Polynomial degree of the parameters in the signal")
        self.val_fraction = dspin(*rule_range("fit_val_fraction", least=0.01, most=0.5), 0.1, 0.05,
                                  2, "Pairs held out for the held-out likelihood and the diagnostics")
        self.fit_seed = spin(*rule_range("seed", most=MAX_SEED), 0, 1,
                             "Seeds the held-out split (and Noise2Void)")
        self.fit_box.setLayout(form([("Kind", self.kind), ("Gaussians", self.n_gaussians),
                                     ("Degree", self.degree), ("Held-out fraction", self.val_fraction),
                                     ("Seed", self.fit_seed)]))
        lay.addWidget(self.fit_box)

        self.fit_btn = self.run_btn
        self.add_run_row(lay, "Fit", idle_text="Choose a source, then Fit.")

        box = QGroupBox("Result")
        self.model_combo = SessionChooser(Registry.NOISE_MODELS)
        self.save_btn = QPushButton("Save…")
        self.load_btn = QPushButton("Load…")
        self.verdict = status_label()
        self.large_btn = QPushButton("Large figure")
        self.large_btn.setToolTip("The diagnostics at four signal levels, docked below the canvas")
        f = form([("Noise model", self.model_combo)])
        row = QHBoxLayout()
        row.addWidget(self.save_btn)
        row.addWidget(self.load_btn)
        f.addRow(row)
        f.addRow(self.verdict)
        f.addRow(self.large_btn)
        box.setLayout(f)
        self.result_layout = f
        lay.addWidget(box)
        lay.addStretch(1)

        self.source.currentIndexChanged.connect(self._on_source)
        self.kind.currentIndexChanged.connect(self._on_kind)
        self.save_btn.clicked.connect(lambda: self.save_noise_model())
        self.load_btn.clicked.connect(lambda: self.load_noise_model())
        self.model_combo.currentIndexChanged.connect(self._show_entry)
        self.large_btn.clicked.connect(lambda: self.show_large_figure())
        for chooser in self._choosers_of().values():
            for c in chooser:
                c.currentIndexChanged.connect(self.update_controls)
        self._on_source()
        self._on_kind()
        self.set_state(TaskState.IDLE)
        self._show_entry()

    # -- ui ------------------------------------------------------------------------------------------
    def source_key(self) -> str:
        return self.source.currentData()

    def set_source(self, key: str) -> None:
        idx = self.source.findData(key)
        if idx < 0:
            raise ValueError(f"unknown source {key!r}; one of {[k for _, k in SOURCES]}")
        self.source.setCurrentIndex(idx)

    def _choosers_of(self) -> dict:
        return {"calibration": (self.calib_layer,), "clean": (self.clean_layer, self.clean_noisy_layer),
                "n2v": (self.n2v_layer,), "pseudo": (self.pseudo_noisy_layer, self.pseudo_layer)}

    def _on_source(self, *_) -> None:
        idx = self.source.currentIndex()
        for i in range(self.pages.count()):  # the stack takes the height of the shown page only
            pol = QSizePolicy.Policy.Preferred if i == idx else QSizePolicy.Policy.Ignored
            self.pages.widget(i).setSizePolicy(pol, pol)
        self.pages.setCurrentIndex(idx)
        self.pages.adjustSize()
        known = self.source_key() in KNOWN
        self.fit_box.setVisible(not known)
        self.run_btn.setText("Use" if known else "Fit")
        self.run_tip = ("Create this noise model and make it available for training" if known
                        else "Fit the noise model in the background")
        self.update_controls()

    def _on_kind(self, *_) -> None:
        gmm = self.kind.currentData() == "gmm"
        self.n_gaussians.setEnabled(gmm)
        self.degree.setEnabled(gmm)

    # -- actions ------------------------------------------------------------------------------------
    def blocker(self) -> str:
        missing = [c for c in self._choosers_of().get(self.source_key(), ()) if c.current_layer() is None]
        return "choose the layer(s) of this source (open an image, or File > Open Sample)" if missing else ""

    def fit(self) -> bool:
        """Fit (or, for known models, create) the noise model of the chosen source."""
        if self.source_key() in KNOWN:
            if self.task.running:
                notify_warning("A noise-model fit is running: wait for it or stop it first.")
                return False
            return self.guard("Noise model", self._make_known) is not None
        return self.start()

    def start(self, prepare=None, what=None) -> bool:
        if prepare is None and self.source_key() in KNOWN:
            return self.fit()
        return super().start(prepare, what)

    def _make_known(self):
        if self.source_key() == "gaussian":
            nm = GaussianNoiseModel(self.sigma.value())
            name = f"Gaussian σ={self.sigma.value():g}"
            text = f"Gaussian noise of standard deviation {self.sigma.value():g} (known)"
        else:
            g, r, o = self.gain.value(), self.read_noise.value(), self.offset.value()
            nm = PoissonGaussianNoiseModel(g, r, o)
            name = f"Poisson-Gaussian g={g:g} r={r:g} o={o:g}"
            text = f"Poisson-Gaussian noise (known): gain {g:g}, read noise {r:g}, offset {o:g}"
        entry = self.session.add_noise_model(nm, name, "known parameters", description=text)
        self.last_entry = entry
        self.show_status(f"'{entry.name}' is ready for training.")
        return entry

    def prepare(self):
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
            short, long = layer.name, f"the calibration stack '{layer.name}' ({len(stack)} frames)"

            def make_pairs(report, stop):
                return pairs_from_calibration(stack)
        elif key == "clean":
            clayer, nlayer = self.clean_layer.current_layer(), self.clean_noisy_layer.current_layer()
            clean = check_image_layer(clayer, "clean")
            noisy = check_image_layer(nlayer, "noisy")
            if clayer.name == nlayer.name:
                raise InputError("choose two different layers: the clean image and the noisy one")
            short = f"{nlayer.name} vs {clayer.name}"
            long = f"the noisy '{nlayer.name}' and the clean '{clayer.name}'"

            def make_pairs(report, stop):
                return pairs_from_clean(clean, noisy)
        elif key == "n2v":
            layer = self.n2v_layer.current_layer()
            noisy = check_image_layer(layer, "noisy", channels=True)
            lay = layout_of(noisy.shape, self.n2v_axes.axes_for(noisy), f"'{layer.name}'")
            if lay.has_channels:
                return self._prepare_channels(layer, noisy, lay, kind, opts, vf, seed)
            if noisy.ndim > 3:
                raise InputError(f"'{layer.name}' is {noisy.ndim}D: bootstrapping takes a 2D image "
                                 "or a stack of frames (3D), or channels (Axes with C)")
            n2v = self._n2v_options()
            short = f"N2V bootstrap of {layer.name}"
            long = f"'{layer.name}' bootstrapped with the built-in Noise2Void"

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
            short = f"{nlayer.name} with pseudo-clean {player.name}"
            long = f"'{nlayer.name}' bootstrapped with the pseudo-clean layer '{player.name}'"

            def make_pairs(report, stop):
                return bootstrap_pairs(noisy, pseudo)

        def job(report, stop):
            pairs = make_pairs(report, stop)
            if stop.is_set():
                return None
            nm = fit_noise_model(pairs, kind=kind, val_fraction=vf, seed=seed, callbacks=report,
                                 stop_flag=stop, **opts)
            held = _heldout(pairs, vf, seed)
            return nm, dock_figure(nm, held), held

        settings = {**opts, "val_fraction": vf, "seed": seed}
        return job, {"kind": kind, "settings": settings, "short": short, "long": long}

    def _n2v_options(self) -> dict:
        n2v = {}
        if self.n2v_steps.value():
            n2v["max_steps"] = self.n2v_steps.value()
        if self.n2v_budget.value():
            n2v["time_budget_s"] = float(self.n2v_budget.value())
        return n2v

    def _prepare_channels(self, layer, noisy, lay, kind, opts, vf, seed):
        """Bootstrap a noise model for each channel of ``noisy`` (Noise2Void per channel)."""
        n2v, n = self._n2v_options(), lay.channels

        def job(report, stop):
            models, shown = [], None
            for c in range(n):
                def tagged(ev, c=c):
                    ev.metrics = {**(ev.metrics or {}), "channel": c, "channels": n}
                    report(ev)

                pairs = bootstrap_pairs(lay.channel_view(noisy, c), None, n2v=n2v, seed=seed,
                                        callbacks=tagged, stop_flag=stop)
                if stop.is_set():
                    return None
                nm = fit_noise_model(pairs, kind=kind, val_fraction=vf, seed=seed,
                                     callbacks=tagged, stop_flag=stop, **opts)
                models.append(nm)
                if shown is None or (nm.info.get("verdict") == "suspicious"
                                     and shown[0].info.get("verdict") != "suspicious"):
                    shown = (nm, _heldout(pairs, vf, seed), c)
                if stop.is_set() and c < n - 1:
                    return None
            nm, held, c = shown  # the figure of the first suspicious channel, else channel 1
            self._shown_channel = c
            return ChannelNoiseModels(models), dock_figure(nm, held, f"channel {c + 1}"), held

        settings = {**opts, "val_fraction": vf, "seed": seed}
        return job, {"kind": kind, "settings": settings, "short": f"N2V bootstrap of {layer.name} "
                     f"({n} channels)", "long": f"'{layer.name}' bootstrapped with the built-in "
                     f"Noise2Void, one noise model for each of its {n} channels ({lay.axes})"}

    def on_start(self, meta: dict) -> None:
        self._n2v_val = None
        self.progress.setRange(0, 0)  # busy until the first event gives a total
        self.show_status("Preparing pairs…")

    def save_noise_model(self, path=None):
        entry = self.model_combo.current_entry()
        if entry is None:
            self.show_error("Save: there is no noise model yet: fit or create one first.")
            return None
        path = ask_save(self, "Save noise model", f"{entry.name}.hdnoise", NOISE_FILTER, ".hdnoise",
                        path)
        if path is None or self.guard("Save noise model", lambda: entry.model.save(path) or True) is None:
            return None
        entry.path = path
        notify_info(f"Saved noise model '{entry.name}' to {path}")
        return path

    def load_noise_model(self, path=None):
        path = ask_open(self, "Load noise model", NOISE_FILTER, path)
        if path is None:
            return None
        entry = self.guard("Load noise model", self.session.open_noise_model_file, path)
        if entry is not None:
            self.last_entry = entry
        return entry

    # -- worker events (GUI thread) ----------------------------------------------------------------
    def on_events(self, events) -> None:
        for ev in events:
            if ev.task == EventTask.N2V and ev.kind == EventKind.STOPPED and self.state == TaskState.STOPPING:
                # the stop ended Noise2Void only: the pseudo-clean image and the fit come next,
                # and Stop can end the fit
                self.set_state(TaskState.RUNNING)
                notify_info("Noise2Void stopped early: predicting the pseudo-clean image and "
                            "fitting with what it has learnt (Stop again ends the fit).")
        last = events[-1]
        if last.total:
            self.progress.setRange(0, last.total)
            self.progress.setValue(min(last.step, last.total))
        m = last.metrics
        ch = f"channel {m['channel'] + 1} of {m['channels']}: " if m.get("channels") else ""
        if last.task == EventTask.N2V:
            text = (f"Noise2Void (pseudo-clean image): step {last.step} (until its validation "
                    f"loss levels off, at most {last.total})")
            if m.get("val_loss") is not None:
                self._n2v_val = m["val_loss"]
            if getattr(self, "_n2v_val", None) is not None:
                text += f", val loss {self._n2v_val:.4g}"
        elif last.task == EventTask.N2V_PREDICT:
            text = f"Noise2Void: predicting the pseudo-clean image, frame {last.step} / {last.total}"
        else:
            text = f"Fitting: iteration {last.step} / {last.total}"
            if m.get("val_nll") is not None:
                text += f", held-out NLL {m['val_nll']:.4f} nats/px"
        if self.state == TaskState.STOPPING:
            text += " · stopping…"
        self.show_status(ch + text)

    def on_result(self, out) -> TaskState:
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        if out.value is None:
            self.show_status("Stopped before fitting started; no noise model was made.")
            return TaskState.STOPPED
        nm, fig, held = out.value
        meta = self.meta
        self._pending_fig = fig  # shown by _show_entry when the session announces the new model
        entry = self.session.add_noise_model(
            nm, fit_name(meta["kind"], meta["settings"], meta["short"]), f"fitted on {meta['long']}",
            heldout=held, description=fit_description(meta["kind"], meta["settings"], meta["long"], nm))
        self._pending_fig = None
        if isinstance(nm, ChannelNoiseModels):
            entry.shown_channel = getattr(self, "_shown_channel", 0)
        self.last_entry = entry
        self.show_status(f"{'Stopped' if out.stopped else 'Fitted'} in {self.elapsed():.1f} s: "
                         f"'{entry.name}' is ready for training.")
        return TaskState.STOPPED if out.stopped else TaskState.DONE

    def _show_entry(self, *_) -> None:
        entry = self.model_combo.current_entry()
        if entry is None:
            self.verdict.setText("")
            return
        info = getattr(entry.model, "info", None) or {}
        verdict = info.get("verdict")
        if isinstance(entry.model, ChannelNoiseModels) and verdict is not None:
            self.verdict.setText("<br>".join(
                f"<b>Channel {c + 1}</b> · {verdict_html(ch)}" if ch.get("verdict") else
                f"<b>Channel {c + 1}</b>: known parameters" for c, ch in enumerate(info["channels"])))
            self._show_pending_or_stored(entry)
            return
        if verdict is None:
            self.verdict.setText(f"<b>{html.escape(entry.name)}</b>: known parameters "
                                 f"({html.escape(repr(entry.model))}); no fit, no diagnostics.")
            if self.canvas is not None:
                self.canvas.setVisible(False)
            return
        self.verdict.setText(verdict_html(info))
        self._show_pending_or_stored(entry)

    def _show_pending_or_stored(self, entry) -> None:
        if self._pending_fig is not None:
            self._show_figure(self._pending_fig, entry)
            self._pending_fig = None
        elif entry is not self._figure_entry or self.canvas is None:
            model = entry.model
            if isinstance(model, ChannelNoiseModels):  # the channel whose pairs were kept
                model = model[getattr(entry, "shown_channel", 0)]
            fig = self.guard("Diagnostics", dock_figure, model, entry.heldout)
            if fig is not None:
                self._show_figure(fig, entry)
        else:
            self.canvas.setVisible(True)

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
        model = entry.model
        if isinstance(model, ChannelNoiseModels):  # the channel whose pairs were kept
            model = model[getattr(entry, "shown_channel", 0)]
        fig = self.guard("Diagnostics", diagnostics_figure, model, *(entry.heldout or ()),
                         figsize=(11, 5.5))
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

    def update_controls(self, *_) -> None:
        super().update_controls()
        self.load_btn.setEnabled(not self.busy)


def verdict_html(info: dict) -> str:
    """The verdict with why: the reasons when suspicious, the checks that passed when good."""
    verdict = info["verdict"]
    colour = "#5c5" if verdict == "good" else "#e93"
    text = f"Verdict: <b style='color:{colour}'>{verdict}</b>"
    nll, hist = info.get("heldout_nll"), info.get("heldout_nll_histogram")
    if nll is not None:
        text += f" · held-out NLL {nll:.4f} nats/px"
        if hist is not None:
            text += f" (histogram model {hist:.4f})"
    reasons, checks = info.get("reasons") or [], info.get("checks") or []
    if reasons:
        text += "<br>Suspicious because:<ul>" + "".join(
            f"<li>{html.escape(r, quote=False)}</li>" for r in reasons) + "</ul>"
    if checks:
        text += ("<br>Checked and fine:" if reasons else "<br>Good because:") + "<ul>" + "".join(
            f"<li>{html.escape(c, quote=False)}</li>" for c in checks) + "</ul>"
    return text
