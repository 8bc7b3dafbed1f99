"""Helpers shared by the widgets: layer and model choosers, input checks, output layers, messages."""

from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..engine import InputError
from ..session import get_session

# -- notifications (GUI thread only) ---------------------------------------------------------------


def notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


class TaskState(enum.Enum):
    """Where a widget's long-running task stands; buttons are enabled from it."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"


# -- choosers --------------------------------------------------------------------------------------


class LayerChooser(QComboBox):
    """A combo box of the viewer's Image (and Labels) layers that follows the layer list.

    Labels layers are listed so that choosing one by mistake gives a clear message rather than a
    silently missing entry. ``prefer`` picks the default among new layers (e.g. 3D stacks for a
    calibration stack).
    """

    def __init__(self, viewer, prefer: Callable | None = None, parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.prefer = prefer
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(10)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        ev = viewer.layers.events
        ev.inserted.connect(self._on_inserted)
        ev.removed.connect(self.refresh)
        ev.reordered.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()
        self._select_default()

    @staticmethod
    def _listed(layer) -> bool:
        from napari.layers import Image, Labels

        return isinstance(layer, (Image, Labels))

    def _on_inserted(self, event) -> None:
        layer = event.value
        layer.events.name.connect(self.refresh)
        self.refresh()
        if not self._listed(layer):
            return
        current = self.current_layer()
        if current is None or (self.prefer is not None and self.prefer(layer)
                               and not self.prefer(current)):
            self.setCurrentText(layer.name)

    def _select_default(self) -> None:
        active = self.viewer.layers.selection.active
        cands = [ly for ly in self.viewer.layers if self._listed(ly)]
        if self.prefer is not None:
            good = [ly for ly in cands if self.prefer(ly)]
            cands = good or cands
        if active is not None and active in cands:
            self.setCurrentText(active.name)
        elif cands:
            self.setCurrentText(cands[0].name)

    def refresh(self, *_) -> None:
        current = self.currentText()
        names = [ly.name for ly in self.viewer.layers if self._listed(ly)]
        if names == [self.itemText(i) for i in range(self.count())]:
            return
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if current not in names:
            self.currentIndexChanged.emit(self.currentIndex())

    def current_layer(self):
        name = self.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def set_layer(self, name: str) -> None:
        if self.findText(name) < 0:
            raise ValueError(f"no layer named {name!r}")
        self.setCurrentText(name)


class SessionChooser(QComboBox):
    """A combo box of the session's HDN models (``kind="models"``) or noise models."""

    def __init__(self, kind: str, parent=None) -> None:
        super().__init__(parent)
        self.kind = kind
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(10)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        session = get_session()
        signal = session.models_changed if kind == "models" else session.noise_models_changed
        signal.connect(self._on_changed)
        self.destroyed.connect(lambda *_, s=signal, f=self._on_changed: _disconnect(s, f))
        self._on_changed("")

    def _entries(self) -> dict:
        s = get_session()
        return s.models if self.kind == "models" else s.noise_models

    def _on_changed(self, added: str) -> None:
        try:
            current = self.currentText()
        except RuntimeError:  # the Qt object is gone
            return
        names = list(self._entries())
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        self.blockSignals(False)
        pick = added if added in names else (current if current in names else (names[-1] if names else ""))
        if pick:
            self.setCurrentText(pick)
        self.currentIndexChanged.emit(self.currentIndex())

    def current_entry(self):
        return self._entries().get(self.currentText())


def _disconnect(signal, slot) -> None:
    try:
        signal.disconnect(slot)
    except Exception:  # noqa: BLE001 - already gone
        pass


# -- input checks ----------------------------------------------------------------------------------

MAX_WIDGET_NDIM = 4


def check_image_layer(layer, role: str = "image") -> np.ndarray:
    """Return the layer's data as a numpy array, or raise InputError saying what to do instead."""
    from napari.layers import Image, Labels

    if layer is None:
        raise InputError(
            f"no {role} layer chosen: open an image (or File > Open Sample > Hierarchical "
            "DivNoising) and choose it in the widget"
        )
    name = layer.name
    if isinstance(layer, Labels):
        raise InputError(
            f"'{name}' is a Labels layer (a segmentation), not an image: choose the Image layer "
            "holding the noisy data"
        )
    if not isinstance(layer, Image):
        raise InputError(f"'{name}' is a {type(layer).__name__} layer: choose an Image layer")
    if layer.rgb:
        raise InputError(
            f"'{name}' is an RGB(A) image; HDN restores one channel at a time: split it (right-click "
            "the layer > Split RGB) or convert it to grayscale, then choose one channel"
        )
    if layer.multiscale:
        raise InputError(
            f"'{name}' is a multiscale (pyramid) layer: open its full-resolution level as a "
            "normal image layer"
        )
    data = layer.data
    shape = tuple(data.shape)
    if len(shape) < 2 or 0 in shape:
        raise InputError(f"'{name}' is empty (shape {shape}): choose a layer with image data")
    if len(shape) > MAX_WIDGET_NDIM:
        raise InputError(
            f"'{name}' has {len(shape)} dimensions {shape}; the widgets take 2D images and 3D/4D "
            "stacks of 2D frames (TYX, ZYX, TZYX...). If one axis is a channel, split it "
            "(right-click the layer > Split Stack) and choose one channel; the Python API takes "
            "up to 5D"
        )
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"'{name}' has data of type {arr.dtype}: HDN needs numbers (integer or float)")
    return arr


def check_not_blank(arr: np.ndarray, name: str) -> None:
    """Refuse an image whose pixels all have one value (e.g. a new, empty layer)."""
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(
            f"'{name}' is blank (every pixel is {lo:g}): there is nothing to learn from; choose the "
            "layer with the noisy data"
        )


def check_patch_fits(arr: np.ndarray, patch: int, name: str) -> None:
    h, w = arr.shape[-2:]
    if min(h, w) < patch:
        best = max(8, min(h, w) // 8 * 8)
        raise InputError(
            f"'{name}' ({h}x{w} pixels per frame) is smaller than the patch size {patch}: choose a "
            f"patch size of at most {min(h, w)} (e.g. {best}) or a larger image"
        )


def axes_choices(ndim: int) -> list[str]:
    """Axes strings offered for a layer of ``ndim`` dimensions (all end with YX)."""
    return {2: ["YX"], 3: ["TYX", "ZYX", "SYX"], 4: ["TZYX", "STYX", "SZYX"]}.get(ndim, [])


class AxesChooser(QComboBox):
    """Axes of the chosen layer; disabled (YX) for 2D layers."""

    def __init__(self, layer_chooser: LayerChooser, parent=None) -> None:
        super().__init__(parent)
        self._layers = layer_chooser
        layer_chooser.currentIndexChanged.connect(self.update_choices)
        self.setToolTip(
            "What the leading axes of the layer are. T (time), Z (slices) and S (samples) are all "
            "restored frame by frame; the choice is recorded with the model."
        )
        self.update_choices()

    def update_choices(self, *_) -> None:
        layer = self._layers.current_layer()
        ndim = getattr(layer, "ndim", 2) if layer is not None else 2
        choices = axes_choices(ndim) or ["YX"]
        if choices != [self.itemText(i) for i in range(self.count())]:
            self.clear()
            self.addItems(choices)
        self.setEnabled(len(choices) > 1)

    def axes_for(self, arr: np.ndarray) -> str:
        ax = self.currentText() or "YX"
        if len(ax) != arr.ndim:  # the layer changed shape since the choices were made
            self.update_choices()
            ax = (axes_choices(arr.ndim) or ["YX"])[0]
        return ax


# -- output layers ---------------------------------------------------------------------------------


def output_name(source_name: str, what: str, suffix: str = "") -> str:
    return f"{source_name} HDN {what}" + (f" {suffix}" if suffix else "")


def add_or_replace_image(viewer, name: str, data: np.ndarray, like, *, leading: int = 0,
                         metadata: dict | None = None, contrast_limits=None, colormap=None,
                         leading_translate=None, translate=None, visible: bool = True):
    """Put ``data`` in the Image layer ``name`` (replacing its data if it exists) or add one.

    The layer gets the scale and translate of the input layer ``like``; ``leading`` extra leading
    axes (e.g. the sample axis) get scale 1 and translate 0 (or ``leading_translate``).
    """
    scale = (1.0,) * leading + tuple(like.scale)[-(data.ndim - leading):]
    lt = tuple(leading_translate) if leading_translate is not None else (0.0,) * leading
    if translate is None:
        translate = lt + tuple(like.translate)[-(data.ndim - leading):]
    meta = dict(metadata or {})
    if contrast_limits is None:
        contrast_limits = _robust_limits(data)
    existing = viewer.layers[name] if name in viewer.layers else None
    from napari.layers import Image

    if isinstance(existing, Image) and existing.ndim == data.ndim and not existing.rgb:
        existing.data = data
        existing.scale = scale
        existing.translate = translate
        existing.metadata = meta
        existing.contrast_limits = contrast_limits
        existing.visible = visible
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    kwargs = {}
    if colormap:
        kwargs["colormap"] = colormap
    return viewer.add_image(data, name=name, scale=scale, translate=translate, metadata=meta,
                            contrast_limits=contrast_limits, visible=visible, **kwargs)


def _robust_limits(data: np.ndarray) -> tuple[float, float]:
    flat = np.asarray(data).ravel()
    if flat.size > 1_000_000:
        flat = flat[:: flat.size // 1_000_000 + 1]
    lo, hi = (float(v) for v in np.percentile(flat, [0.5, 99.5]))
    if not hi > lo:
        lo, hi = float(flat.min()), float(flat.max())
        if not hi > lo:
            hi = lo + 1.0
    return lo, hi


def input_limits(layer, data: np.ndarray) -> tuple[float, float]:
    """Contrast limits for a restoration of ``layer``: the input's, so that they compare at a glance."""
    try:
        lo, hi = (float(v) for v in layer.contrast_limits)
        if hi > lo:
            return lo, hi
    except Exception:  # noqa: BLE001
        pass
    return _robust_limits(data)


# -- small form helpers ----------------------------------------------------------------------------


def combo(items=(), tip: str = "", min_chars: int = 10) -> QComboBox:
    """A combo box that does not widen the dock to fit its longest item."""
    w = QComboBox()
    w.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    w.setMinimumContentsLength(min_chars)
    w.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
    for it in items:
        if isinstance(it, tuple):
            w.addItem(*it)
        else:
            w.addItem(it)
    if tip:
        w.setToolTip(tip)
    return w


MAX_SEED = 999_999


def spin(lo: int, hi: int, value: int, step: int = 1, tip: str = "", special: str = "") -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setValue(value)
    if tip:
        w.setToolTip(tip)
    if special:
        w.setSpecialValueText(special)
    return w


def dspin(lo: float, hi: float, value: float, step: float = 0.1, decimals: int = 2,
          tip: str = "") -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setDecimals(decimals)
    w.setSingleStep(step)
    w.setValue(value)
    if tip:
        w.setToolTip(tip)
    return w


def form() -> QFormLayout:
    f = QFormLayout()
    f.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    f.setContentsMargins(0, 0, 0, 0)
    return f


def status_label(text: str = "") -> QLabel:
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return lab


def scroll_body(widget: QWidget) -> QVBoxLayout:
    """Give ``widget`` a vertical scroll area and return the layout of its content.

    Docked widgets get the height napari's window leaves them; a long form must scroll rather
    than squash its rows.
    """
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    inner = QWidget()
    area.setWidget(inner)
    outer.addWidget(area)
    return QVBoxLayout(inner)


class Collapsible(QWidget):
    """A section with a toggle button that shows or hides its content (for 'Advanced')."""

    def __init__(self, title: str, parent=None) -> None:
        super().__init__(parent)
        self.button = QToolButton(text=title, checkable=True, checked=False)
        self.button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.button.setArrowType(Qt.ArrowType.RightArrow)
        self.button.setStyleSheet("QToolButton { border: none; }")
        self.content = QFrame()
        self.content.setVisible(False)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.button)
        lay.addWidget(self.content)
        self.button.toggled.connect(self.set_expanded)

    def set_expanded(self, on: bool) -> None:
        self.button.setChecked(on)
        self.button.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.content.setVisible(on)


def run_guarded(what: str, fn: Callable, *args, **kwargs):
    """Call ``fn``; turn user errors into an error notification and return None instead of raising.

    Used around the GUI-thread part of every action (checks, configs) so that a bad input never
    escapes as an exception.
    """
    from ._workers import user_message

    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        msg, expected = user_message(exc, what)
        if not expected:
            import logging

            logging.getLogger("napari_hdn").exception("%s failed", what)
        notify_error(msg)
        return None
