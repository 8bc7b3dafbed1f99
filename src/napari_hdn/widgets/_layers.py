"""Output layers: names that say what a layer is first, axis labels, placement over the input;
where the view of a layer is (the frame shown, the centre and the size on screen); and layers that
go with the layer they were made from.

Names read ``"HDN <what> · <input layer> · <settings>"`` (e.g. ``"HDN MMSE · striped fluorescence ·
L1 prior-mean"``): the layer list cuts long names at the end, so what the layer is comes first.
The full settings are in the layer's metadata under ``"hdn"``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

#: axis letters of the widgets' axes strings -> napari axis labels (the sliders show them)
AXIS_LABELS = {"T": "T", "Z": "Z", "S": "frame", "C": "C", "Y": "y", "X": "x"}
SAMPLE_AXIS = "sample"


def output_name(source_name: str, what: str, settings: str = "") -> str:
    return f"HDN {what} · {source_name}" + (f" · {settings}" if settings else "")


def axis_labels(axes: str, leading: tuple[str, ...] = ()) -> tuple[str, ...]:
    """napari axis labels for data with ``axes`` (e.g. "ZYX") and extra ``leading`` axes."""
    return (*leading, *(AXIS_LABELS.get(a, a) for a in axes.upper()))


def levels_text(modes) -> str:
    """'L1 prior-mean, L2 zero' for the levels that are not 'posterior' ('' when all are)."""
    return ", ".join(f"L{lv + 1} {m}" for lv, m in enumerate(modes) if m != "posterior")


def add_or_replace_image(viewer, name: str, data: np.ndarray, like, *, leading: int = 0,
                         metadata: dict | None = None, contrast_limits=None, colormap=None,
                         translate=None, visible: bool = True, labels: tuple | None = None,
                         rgb: bool = False, same_data: bool = False):
    """Put ``data`` in the Image layer ``name`` (replacing its data if it exists) or add one.

    The layer gets the scale and translate of the input layer ``like``; ``leading`` extra leading
    axes (e.g. the sample axis) get scale 1 and translate 0. ``labels`` are its axis labels.
    ``rgb``: the last axis of ``data`` holds colours (as in an RGB input layer).
    ``same_data``: an existing layer already shows exactly ``data`` (filled as it was computed):
    its data are not set again (each set costs napari a refresh and a thumbnail).
    """
    from napari.layers import Image

    ndim = data.ndim - (1 if rgb else 0)  # napari's dimensions: an RGB layer's colours are not one
    scale = (1.0,) * leading + tuple(like.scale)[-(ndim - leading):]
    if translate is None:
        translate = (0.0,) * leading + tuple(like.translate)[-(ndim - leading):]
    if rgb and labels is not None:
        labels = labels[:-1]
    meta = dict(metadata or {})
    if contrast_limits is None:
        contrast_limits = robust_limits(data)
    units = None
    if getattr(like, "units", None) is not None:  # napari 0.6+: the input's units too
        units = ("pixel",) * leading + tuple(str(u) for u in like.units)[-(ndim - leading):]
    existing = viewer.layers[name] if name in viewer.layers else None
    if isinstance(existing, Image) and existing.ndim == ndim and existing.rgb == rgb:
        # only what changed: each of scale, translate and visible costs a refresh (~9 ms each on
        # a 2-core CPU under Xvfb) even when set to its current value, which the artefact
        # preview, updated on every level toggle, would pay every time
        if not (same_data and existing.data.shape == data.shape):
            existing.data = data
        if not np.array_equal(np.asarray(existing.scale, float), np.asarray(scale, float)):
            existing.scale = scale
        if not np.array_equal(np.asarray(existing.translate, float), np.asarray(translate, float)):
            existing.translate = translate
        existing.metadata = meta
        if tuple(map(float, existing.contrast_limits)) != tuple(map(float, contrast_limits)):
            existing.contrast_limits = contrast_limits
        if existing.visible != visible:
            existing.visible = visible
        if labels is not None and tuple(existing.axis_labels) != tuple(labels):
            existing.axis_labels = labels
        if units is not None and tuple(str(u) for u in existing.units) != units:
            existing.units = units
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    kwargs = {"colormap": colormap} if colormap else {}
    if labels is not None:
        kwargs["axis_labels"] = labels
    if units is not None:
        kwargs["units"] = units
    return viewer.add_image(data, name=name, scale=scale, translate=translate, metadata=meta,
                            contrast_limits=contrast_limits, visible=visible, rgb=rgb, **kwargs)


@contextmanager
def keep_selection(viewer):
    """Layers added inside leave the layer selection as it is.

    napari selects every new layer, which switches the layer controls: about half of the ~100-200
    ms that one ``add_image`` costs on a 2-core CPU under Xvfb. Layers that appear while a job
    runs (the live results of a prediction) should neither cost that nor take the user's
    selection away. Uses napari's ``LayerList._activate_on_insert`` where it exists (0.4-0.6);
    without it layers are added as usual.
    """
    layers = viewer.layers
    before = getattr(layers, "_activate_on_insert", None)
    if before is None:
        yield
        return
    layers._activate_on_insert = False
    try:
        yield
    finally:
        layers._activate_on_insert = before


def robust_limits(data: np.ndarray) -> tuple[float, float]:
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
    except Exception:  # noqa: BLE001 - a layer without usable limits
        pass
    return robust_limits(data)


def result_settings(res, settings: str = "") -> str:
    """The settings part of a prediction's layer names: a stopped one says what it holds."""
    requested = res.info.get("n_requested", res.n_samples)
    if res.info.get("stopped"):
        if requested == "auto" and res.info.get("frames", 1) > 1:
            count = f"{res.info['frames_done']} of {res.info['frames']} frames"
        elif requested == "auto":
            count = f"{res.n_samples} samples"
        else:
            count = f"{res.n_samples} of {int(requested)} samples"
        settings = f"{settings}, {count}" if settings else count
    return settings


def add_result_layers(viewer, layer, res, model_name: str, axes: str, settings: str = "",
                      extra: dict | None = None, shown: dict | None = None,
                      select=None) -> list:
    """Add (or replace) the MMSE, variance and, when present, samples layers of a prediction.

    A prediction stopped early (``res.info["stopped"]``) gets its own layers, named with the
    number of samples (or frames) it holds, so that it never overwrites a finished one.
    ``shown``: outputs ("mmse", "variance", "samples") whose layer of the result's name already
    shows exactly the result, with its contrast limits (filled frame by frame as they finished).
    The MMSE layer is selected (what one looks at first); ``select``, when given, is called with
    it instead (the predict widget selects it in an event-loop turn of its own: a selection
    switches the layer controls, ~50 ms).
    """
    base = layer.name
    stopped = bool(res.info.get("stopped"))
    requested = res.info.get("n_requested", res.n_samples)
    requested = requested if requested == "auto" else int(requested)
    settings = result_settings(res, settings)
    meta = {"source_layer": base, "model": model_name, "axes": axes, "n_samples": res.n_samples,
            "samples_per_frame": res.info.get("samples_per_frame"),
            "n_requested": requested, "stopped": stopped, "seed": res.seed,
            "levels": list(res.levels), "tiles": res.info.get("tiles"), **(extra or {})}
    lims = input_limits(layer, res.mmse)
    labels = axis_labels(axes)
    rgb = bool(getattr(layer, "rgb", False)) and axes.upper().endswith("YXC")
    shown = shown or {}
    out = [
        add_or_replace_image(viewer, output_name(base, "MMSE", settings), res.mmse, layer,
                             metadata={"hdn": {**meta, "output": "mmse"}},
                             contrast_limits=shown.get("mmse", lims), labels=labels, rgb=rgb,
                             same_data="mmse" in shown),
        add_or_replace_image(viewer, output_name(base, "variance", settings), res.variance, layer,
                             metadata={"hdn": {**meta, "output": "variance"}},
                             colormap=None if rgb else "magma", visible=False, labels=labels,
                             rgb=rgb, contrast_limits=shown.get("variance"),
                             same_data="variance" in shown),
    ]
    if res.samples is not None:
        out.insert(0, add_or_replace_image(
            viewer, output_name(base, "samples", settings), res.samples, layer, leading=1,
            metadata={"hdn": {**meta, "output": "samples"}},
            contrast_limits=shown.get("samples", lims), visible=False,
            labels=axis_labels(axes, (SAMPLE_AXIS,)), rgb=rgb, same_data="samples" in shown))
    if select is None:
        viewer.layers.selection.active = out[-2]
    else:
        select(out[-2])
    return out


def view_of(viewer, layer, shape):
    """(frame, centre, visible) of ``layer`` (data of ``shape``) in the view: the index of the
    frame shown (the leading axes), the centre of the view in data coordinates (y, x) and the
    (height, width) on screen; centre and visible are None when the last two axes are not shown."""
    lead = len(shape) - 2
    frame: tuple = ()
    if lead:
        pt = np.asarray(layer.world_to_data(viewer.dims.point))[:lead]
        frame = tuple(int(np.clip(round(float(v)), 0, s - 1)) for v, s in zip(pt, shape[:lead]))
    dims = viewer.dims
    if dims.ndisplay != 2 or tuple(dims.displayed)[-2:] != (dims.ndim - 2, dims.ndim - 1):
        return frame, None, None
    scene = getattr(viewer, "scene", None)
    camera = scene.camera if scene is not None else viewer.camera
    point = np.asarray(dims.point, float)
    point[-2:] = np.asarray(camera.center, float)[-2:]
    centre = np.asarray(layer.world_to_data(point), float)[-2:]
    corners = np.asarray(layer.corner_pixels)[:, -2:]
    return frame, centre, tuple(corners[1] + 1 - corners[0])


def follow_removals(widget, viewer, slot) -> None:
    """Call ``slot(event)`` when a layer is removed from ``viewer``, for as long as ``widget``
    lives."""
    removed = viewer.layers.events.removed
    removed.connect(slot)
    widget.destroyed.connect(lambda *_: _disconnect(removed, slot))


def remove_layer_soon(viewer, name: str) -> None:
    """Remove the layer ``name`` (if there) once the layer list has finished its current change."""
    from qtpy.QtCore import QTimer

    QTimer.singleShot(0, lambda: _remove_layer(viewer, name))


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
