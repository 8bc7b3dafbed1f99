"""Small matplotlib canvases embedded in the widgets (training curves, noise-model diagnostics)."""

from __future__ import annotations

import time

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy


def _style(fig: Figure) -> None:
    fig.set_facecolor("#262930")  # napari's dark theme background
    for ax in fig.axes:
        ax.set_facecolor("#262930")
        ax.tick_params(colors="0.85", labelsize=7)
        for s in ax.spines.values():
            s.set_color("0.6")
        ax.xaxis.label.set_color("0.85")
        ax.yaxis.label.set_color("0.85")
        ax.title.set_color("0.9")


class TrainingPlot(FigureCanvasQTAgg):
    """Live curves: train loss (per step, and a running mean) and validation loss; KL per level.

    :meth:`add_step` / :meth:`add_epoch` only store numbers. :meth:`redraw` updates the existing
    lines (no re-layout) at most every ``min_interval`` seconds and only while the plot is visible:
    a matplotlib draw runs in the GUI thread, and a fast training loop must not make the viewer
    sluggish.
    """

    MAX_POINTS = 2000  # drawn per curve (longer runs are thinned)

    def __init__(self, min_interval: float = 1.0) -> None:
        self.fig = Figure(figsize=(4.0, 3.6))
        super().__init__(self.fig)
        self.fig.subplots_adjust(left=0.17, right=0.97, top=0.97, bottom=0.12, hspace=0.12)
        self.ax_loss = self.fig.add_subplot(2, 1, 1)
        self.ax_kl = self.fig.add_subplot(2, 1, 2, sharex=self.ax_loss)
        self.ax_loss.tick_params(labelbottom=False)
        self.ax_loss.set_ylabel("loss (nats/px)", fontsize=7)
        self.ax_kl.set_ylabel("KL per level (nats)", fontsize=7)
        self.ax_kl.set_xlabel("step", fontsize=7)
        (self._raw,) = self.ax_loss.plot([], [], color="0.55", lw=0.6, label="train (per step)")
        (self._smooth,) = self.ax_loss.plot([], [], color="C0", lw=1.2, label="train (running mean)")
        (self._val,) = self.ax_loss.plot([], [], "o-", color="C1", ms=3, lw=1.2, label="validation")
        self.ax_loss.legend(fontsize=6, loc="upper right", frameon=False, labelcolor="0.85")
        self._kl_lines: list = []
        _style(self.fig)
        self.setMinimumHeight(260)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.min_interval = min_interval
        self._last = 0.0
        self.draws = 0
        self.reset()

    def reset(self) -> None:
        self.steps: list[int] = []
        self.train: list[float] = []
        self.kl: list[list[float]] = []
        self.val_steps: list[int] = []
        self.val: list[float] = []
        for line in self._kl_lines:
            line.remove()
        self._kl_lines = []
        if self.ax_kl.get_legend() is not None:
            self.ax_kl.get_legend().remove()
        self._dirty = True
        self.redraw(force=True)

    def snapshot(self) -> dict:
        """The curves as plain lists (kept with a trained model, so that Resume continues them)."""
        return {"steps": list(self.steps), "train": list(self.train), "kl": [list(k) for k in self.kl],
                "val_steps": list(self.val_steps), "val": list(self.val)}

    def restore(self, curves: dict) -> None:
        """Show the curves of a :meth:`snapshot` (new points are added after them)."""
        self.reset()
        self.steps, self.train = list(curves["steps"]), list(curves["train"])
        self.kl = [list(k) for k in curves["kl"]]
        self.val_steps, self.val = list(curves["val_steps"]), list(curves["val"])
        self._dirty = True
        self.redraw(force=True)

    def add_step(self, step: int, metrics: dict) -> None:
        loss = metrics.get("train_loss")
        if loss is None or not np.isfinite(loss):
            return
        self.steps.append(step)
        self.train.append(float(loss))
        self.kl.append([float(v) for v in metrics.get("kl_per_level", [])])
        self._dirty = True

    def add_epoch(self, step: int, metrics: dict) -> None:
        val = metrics.get("val_loss")
        if val is None:
            val = metrics.get("train_loss")
        if val is not None and np.isfinite(val):
            self.val_steps.append(step)
            self.val.append(float(val))
            self._dirty = True

    def showEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().showEvent(event)
        self.redraw(force=True)

    def redraw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self._dirty and not force:
            return
        if not force and now - self._last < self.min_interval:
            return
        if not self.isVisible():
            return  # drawn when shown (showEvent)
        self._last = now
        self._dirty = False
        x = np.asarray(self.steps, float)
        y = np.asarray(self.train, float)
        thin = slice(None, None, max(1, len(x) // self.MAX_POINTS))
        self._raw.set_data(x[thin], y[thin])
        k = max(1, min(50, len(y) // 10))
        if k > 1:
            sm = np.convolve(y, np.ones(k) / k, mode="valid")
            self._smooth.set_data(x[k - 1 :][thin], sm[thin])
        else:
            self._smooth.set_data(x, y)
        self._val.set_data(self.val_steps, self.val)
        n_lv = max((len(r) for r in self.kl), default=0)
        if n_lv and len(self._kl_lines) != n_lv:
            for line in self._kl_lines:
                line.remove()
            self._kl_lines = [self.ax_kl.plot([], [], lw=1.0, label=f"level {lv + 1}",
                                              color=_level_colour(lv, n_lv))[0] for lv in range(n_lv)]
            self.ax_kl.legend(fontsize=6, ncol=min(3, n_lv), loc="upper right", frameon=False,
                              labelcolor="0.85")
        if n_lv:
            arr = np.array([r if len(r) == n_lv else [np.nan] * n_lv for r in self.kl])
            for lv, line in enumerate(self._kl_lines):
                col = arr[:, lv]
                kk = max(1, min(50, len(col) // 10))
                sm = np.convolve(col, np.ones(kk) / kk, mode="valid") if kk > 1 else col
                line.set_data(x[kk - 1 :][thin], sm[thin])
        ax, axk = self.ax_loss, self.ax_kl
        if len(x) or self.val:
            xs = np.concatenate([x, np.asarray(self.val_steps, float)])
            ax.set_xlim(float(xs.min()) - 0.5, float(xs.max()) + 0.5)
            later = [v for v in (self.val + self.train[len(self.train) // 5 :]) if np.isfinite(v)]
            if later:  # zoom on the later part: the first steps dwarf everything else
                a, b = min(later), max(later)
                pad = 0.1 * (b - a) + 1e-6
                ax.set_ylim(a - pad, b + pad)
            if n_lv:
                finite = arr[np.isfinite(arr)]
                if finite.size:
                    axk.set_ylim(0, float(finite.max()) * 1.1 + 1e-6)
        self.draws += 1
        self.draw_idle()


def _level_colour(lv: int, n: int):
    from matplotlib import colormaps

    return colormaps["viridis"](0.15 + 0.8 * lv / max(1, n - 1))


class FigureCanvas(FigureCanvasQTAgg):
    """A canvas for a ready-made figure (the noise-model diagnostics)."""

    def __init__(self, fig: Figure, height: int = 360) -> None:
        super().__init__(fig)
        self.setMinimumHeight(height)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
