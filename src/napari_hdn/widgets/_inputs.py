"""Input choosers (layers, session models, axes, device) and the checks of what a widget is given.

Every check raises :class:`~napari_hdn.engine.InputError` with what to do instead, in the words of
the widget (its field labels), so that the widget can show it as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox

from ..engine import InputError, available_devices
from ..session import Registry, get_session
from ._forms import narrow

# -- layers ----------------------------------------------------------------------------------------


class LayerChooser(QComboBox):
    """A combo box of the viewer's Image (and Labels) layers that follows the layer list.

    Labels layers are listed so that choosing one by mistake gives a clear message rather than a
    silently missing entry. ``prefer`` picks the default among new layers (e.g. 3D stacks for a
    calibration stack). When the chosen layer is deleted the box does not jump to another layer:
    it stays empty and says which layer was removed, until a layer is chosen.
    """

    def __init__(self, viewer, prefer: Callable | None = None, parent=None) -> None:
        super().__init__(parent)
        narrow(self)
        self.viewer = viewer
        self.prefer = prefer
        self.lost: str | None = None  # name of the chosen layer after it was deleted
        ev = viewer.layers.events
        ev.inserted.connect(self._on_inserted)
        ev.removed.connect(self.refresh)
        ev.reordered.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.activated.connect(self._chosen)
        self.refresh()
        self._select_default()

    @staticmethod
    def _listed(layer) -> bool:
        from napari.layers import Image, Labels

        return isinstance(layer, (Image, Labels))

    def _chosen(self, *_) -> None:
        self.lost = None
        self.setPlaceholderText("")

    def _on_inserted(self, event) -> None:
        layer = event.value
        layer.events.name.connect(self.refresh)
        self.refresh()
        if not self._listed(layer):
            return
        current = self.current_layer()
        first = current is None and self.lost is None
        better = self.prefer is not None and self.prefer(layer) and (
            current is None or not self.prefer(current))
        if first or better:
            self.set_layer(layer.name)

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
        else:
            self.setCurrentIndex(-1)
            if current:  # the chosen layer went away (deleted, or renamed elsewhere)
                self.lost = current
                self.setPlaceholderText(f"('{current}' was removed: choose a layer)")
        self.blockSignals(False)
        if current not in names:
            self.currentIndexChanged.emit(self.currentIndex())

    def current_layer(self):
        name = self.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def set_layer(self, name: str) -> None:
        if self.findText(name) < 0:
            raise ValueError(f"no layer named {name!r}")
        self._chosen()
        self.setCurrentText(name)


class SessionChooser(QComboBox):
    """A combo box of one of the session's registries (HDN models or noise models); each item's
    tooltip is the entry's full description (names are short and may be cut off)."""

    def __init__(self, registry: Registry, parent=None) -> None:
        super().__init__(parent)
        narrow(self)
        self.registry = registry
        signal = get_session().changed(self.registry)
        signal.connect(self._on_changed)
        self.destroyed.connect(lambda *_, s=signal, f=self._on_changed: _disconnect(s, f))
        self.currentIndexChanged.connect(self._tip)
        self._on_changed("")

    def _entries(self) -> dict:
        return get_session().entries(self.registry)

    def _on_changed(self, added: str) -> None:
        try:
            current = self.currentText()
        except RuntimeError:  # the Qt object is gone
            return
        entries = self._entries()
        self.blockSignals(True)
        self.clear()
        for i, (name, entry) in enumerate(entries.items()):
            self.addItem(name)
            self.setItemData(i, entry.description or name, Qt.ItemDataRole.ToolTipRole)
        self.blockSignals(False)
        names = list(entries)
        pick = added if added in names else (current if current in names else (names[-1] if names else ""))
        if pick:
            self.setCurrentText(pick)
        self.currentIndexChanged.emit(self.currentIndex())

    def _tip(self, *_) -> None:
        entry = self.current_entry()
        self.setToolTip(entry.description if entry is not None else "")

    def current_entry(self):
        return self._entries().get(self.currentText())


def _disconnect(signal, slot) -> None:
    try:
        signal.disconnect(slot)
    except Exception:  # noqa: BLE001 - already gone
        pass


def axes_choices(ndim: int, rgb: bool = False) -> list[str]:
    """Axes strings offered for layer data of ``ndim`` dimensions: frames (T, Z, S) and a channel
    axis C (one HDN per channel); ``rgb``: the last axis holds the colour channels (YXC)."""
    if rgb:
        return {3: ["YXC"], 4: ["TYXC", "ZYXC", "SYXC"]}.get(ndim, [])
    return {2: ["YX"], 3: ["TYX", "ZYX", "SYX", "CYX"],
            4: ["TZYX", "STYX", "SZYX", "TCYX", "CZYX", "SCYX"],
            5: ["TZCYX", "TCZYX", "STZYX"]}.get(ndim, [])


def layer_data_ndim(layer) -> tuple[int, bool]:
    """(dimensions of the layer's data, whether it is RGB): an RGB layer's ``ndim`` leaves out
    its colour axis, its data do not."""
    if layer is None:
        return 2, False
    rgb = bool(getattr(layer, "rgb", False))
    return int(getattr(layer, "ndim", 2)) + (1 if rgb else 0), rgb


class AxesChooser(QComboBox):
    """Axes of the chosen layer; disabled (YX) for 2D layers. ``prefer(axes)`` makes those the
    default whenever the layer has that many dimensions (e.g. the axes a model was trained on)."""

    def __init__(self, layer_chooser: LayerChooser, parent=None) -> None:
        super().__init__(parent)
        self._layers = layer_chooser
        self._preferred: str | None = None
        layer_chooser.currentIndexChanged.connect(self.update_choices)
        self.setToolTip(
            "What the leading axes of the layer are. T (time), Z (slices) and S (samples) are all "
            "restored frame by frame; C (channels, or the colours of an RGB layer) gets a noise "
            "model and an HDN per channel. The choice is recorded with the model."
        )
        self.update_choices()

    def prefer(self, axes: str | None) -> None:
        self._preferred = axes.upper() if axes else None
        self.update_choices(force=True)

    def update_choices(self, *_, force: bool = False) -> None:
        ndim, rgb = layer_data_ndim(self._layers.current_layer())
        choices = axes_choices(ndim, rgb) or ["YX"]
        if choices != [self.itemText(i) for i in range(self.count())]:
            self.clear()
            self.addItems(choices)
            force = True
        if force and self._preferred in choices:
            self.setCurrentText(self._preferred)
        self.setEnabled(len(choices) > 1)

    def axes_for(self, arr: np.ndarray) -> str:
        ax = self.currentText() or "YX"
        if len(ax) != arr.ndim:  # the layer changed shape since the choices were made
            self.update_choices()
            rgb = layer_data_ndim(self._layers.current_layer())[1]
            ax = (axes_choices(arr.ndim, rgb) or ["YX"])[0]
        return ax


def device_chooser() -> QComboBox:
    """auto / cuda / mps / cpu, with unavailable devices marked rather than hidden."""
    avail = available_devices()
    w = narrow(QComboBox())
    w.addItem(f"auto ({avail[0]})", "auto")
    for name in ("cuda", "mps", "cpu"):
        w.addItem(name if name in avail else f"{name} (not available here)", name)
    w.setToolTip("Available here: " + ", ".join(avail))
    return w


# -- checks ----------------------------------------------------------------------------------------

MAX_WIDGET_NDIM = 5


def check_image_layer(layer, role: str = "image", channels: bool = False) -> np.ndarray:
    """Return the layer's data as a numpy array, or raise InputError saying what to do instead.

    ``channels``: the widget takes RGB layers and layers with a channel axis (one model per
    channel); otherwise an RGB layer is refused with what to do."""
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
    if layer.rgb and not channels:
        raise InputError(
            f"'{name}' is an RGB(A) image; this widget works on one channel at a time: split it "
            "(right-click the layer > Split RGB) and choose one channel (the Training and Predict "
            "widgets take RGB layers whole, with a model per channel)"
        )
    if layer.multiscale:
        raise InputError(
            f"'{name}' is a multiscale (pyramid) layer: open its full-resolution level as a "
            "normal image layer"
        )
    shape = tuple(layer.data.shape)
    if len(shape) < 2 or 0 in shape:
        raise InputError(f"'{name}' is empty (shape {shape}): choose a layer with image data")
    if len(shape) > MAX_WIDGET_NDIM + (1 if layer.rgb else 0):
        raise InputError(
            f"'{name}' has {len(shape)} dimensions {shape}; the widgets take 2D images and stacks "
            "of 2D frames with up to 5 axes (TYX, ZYX, TZYX, CYX, TCYX, TZCYX...); the Python API "
            "takes more"
        )
    arr = np.asarray(layer.data)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"'{name}' has data of type {arr.dtype}: HDN needs numbers (integer or float)")
    return arr


NO_MODEL = "no model: train one in the Training widget or load a .hdn file (Load…, or File > Open)"


def lazy_layer_data(layer, rgb: bool = False):
    """The data of an image layer backed by dask or zarr (e.g. an OME-Zarr opened by a zarr
    reader; a pyramid's full-resolution level) or memory-mapped, which prediction and training
    must not load whole; else None (``rgb``: RGB layers count too)."""
    from napari.layers import Image

    if not isinstance(layer, Image) or (layer.rgb and not rgb):
        return None
    data = layer.data[0] if layer.multiscale else layer.data
    module = type(data).__module__.split(".")[0]
    return data if module in ("dask", "zarr") or isinstance(data, np.memmap) else None


def chosen_model_and_image(model_chooser: SessionChooser, layer_chooser: LayerChooser,
                           no_model: str = NO_MODEL, channels: bool = False):
    """(model entry, image layer, its data) chosen in two boxes; InputError saying what is missing.
    ``channels``: the widget takes layers with channels (RGB included)."""
    entry = model_chooser.current_entry()
    if entry is None:
        raise InputError(no_model)
    layer = layer_chooser.current_layer()
    return entry, layer, check_image_layer(layer, "image", channels=channels)


def check_not_blank(arr: np.ndarray, name: str) -> None:
    """Refuse an image whose pixels all have one value (e.g. a new, empty layer)."""
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(
            f"'{name}' is blank (every pixel is {lo:g}): there is nothing to learn from; choose the "
            "layer with the noisy data"
        )


def check_model_fits(model, arr, name: str, axes: str | None = None) -> None:
    """Prediction pads to multiples of 2**L; refuse only images smaller than one top-level pixel.
    ``axes`` say where Y and X are (default: the last two axes)."""
    m = model.config.downscale
    ax = (axes or "").upper()
    h, w = (arr.shape[ax.index("Y")], arr.shape[ax.index("X")]) if "Y" in ax and "X" in ax \
        else arr.shape[-2:]
    if min(h, w) < 2:
        raise InputError(f"'{name}' is only {h}x{w} pixels: nothing to restore")
    if max(h, w) < m // 2:
        raise InputError(
            f"'{name}' ({h}x{w}) is much smaller than the model's top level ({m}x{m} pixels, "
            f"{model.levels} levels): use a larger image or a model with fewer levels"
        )


MIN_PATCH = 8  # TrainingConfig's smallest patch


def _split_ok(frames, val_fraction: float, patch: int) -> bool:
    from ..engine.data.arrays import split_train_val

    try:
        split_train_val(frames, val_fraction, patch)
    except InputError:
        return False
    return True


def check_training_fits(shape, axes: str, patch: int, val_fraction: float, name: str,
                        patch_label: str = "Patch size",
                        val_label: str = "Validation fraction") -> None:
    """Raise InputError when the image is too small for the patch size and validation fraction,
    naming the setting that works, in the widget's own labels.

    The engine's own rule decides (``engine.data.split_train_val``, on zero-memory stand-ins of the
    frames): whole frames are held out when there are enough, else a band of rows of each frame.
    """
    h, w = (int(v) for v in shape[-2:])
    n = int(np.prod(shape[:-2])) if len(axes) > 2 else 1
    frames = [np.broadcast_to(np.float32(0), (h, w))] * n
    if _split_ok(frames, val_fraction, patch):
        return
    where = f"'{name}' ({h}x{w} pixels" + (f", {n} frames)" if n > 1 else ")")
    what = f"is too small for {patch_label} {patch} with {val_label} {val_fraction:g}"
    smaller = [p for p in range(min(patch, h, w) // 8 * 8, MIN_PATCH - 1, -8) if p < patch]
    keep_val = next((p for p in smaller if val_fraction > 0 and _split_ok(frames, val_fraction, p)),
                    None)
    no_val = next((p for p in range(min(h, w) // 8 * 8, MIN_PATCH - 1, -8)
                   if _split_ok(frames, 0.0, p)), None)
    if keep_val is not None:
        fix = f"set {patch_label} to {keep_val}"
        if no_val is not None and no_val > keep_val:
            fix += f" (or {patch_label} {no_val} with {val_label} 0, which trains without validation)"
    elif no_val is not None:
        fix = (f"set {patch_label} to {no_val} and {val_label} to 0 (too small to hold out "
               "validation data: the best model is then chosen by the training loss)")
    else:
        raise InputError(f"{where} is smaller than the smallest {patch_label} ({MIN_PATCH}): use a "
                         "larger image")
    raise InputError(f"{where} {what}: {fix}")
