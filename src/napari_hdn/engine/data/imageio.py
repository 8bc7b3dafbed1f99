"""Microscopy images on disk with their axes and pixel size: TIFF in (ImageJ, OME, plain) and
OME-TIFF out.

:func:`read_tiff` returns the data with an :class:`ImageMeta`: the axes the file declares (in
napari-hdn's letters: T, Z, C for channels, RGB samples included, S for frames of no named kind,
Y, X), the physical size of each axis and its unit. Large files come back as
:class:`~.frames.TiffPages`, read on demand, so that training never loads them.
:func:`write_tiff` writes a result with the same metadata, as OME-TIFF (axes, physical sizes
and units in the OME-XML, which Fiji, QuPath, napari and tifffile read) with the X/Y resolution
in the TIFF tags as well (for readers that only know those); a result of an image without any
metadata is a plain TIFF as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

#: a TIFF whose pixels take more than this is read on demand (frames.TiffPages), not loaded,
#: where the caller allows it (training); ``NAPARI_HDN_LAZY_MB`` sets it
LAZY_BYTES = int(float(os.environ.get("NAPARI_HDN_LAZY_MB", "512")) * 2**20)

#: tifffile's axis letters -> napari-hdn's ("S" is tifffile's colour samples: our channels)
_TIFFFILE_LETTERS = {"T": "T", "Z": "Z", "C": "C", "S": "C", "Y": "Y", "X": "X", "Q": "S",
                     "I": "S"}
#: length units, as written in files, -> micrometres per unit
_LENGTH_UM = {"um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0,
              "micrometer": 1.0, "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3,
              "millimeter": 1e3, "cm": 1e4, "m": 1e6, "inch": 25400.0, "\\u00B5m": 1.0}


@dataclass
class ImageMeta:
    """What a file says about its image, beyond the pixels.

    Attributes
    ----------
    axes : str or None
        The axes the file declares, in napari-hdn's letters (None: it declares none).
    scale : dict
        Physical size of a pixel along each axis that has one (``{"Y": 0.25, "X": 0.25}``;
        ``"Z"``: the slice spacing; ``"T"``: the time between frames).
    units : dict
        Unit of each entry of ``scale`` (``"µm"``, ``"s"``).
    rgb : bool
        The channels are the file's colour samples (photometric RGB).
    kind : str
        ``"imagej"``, ``"ome"``, ``"tiff"`` (plain, perhaps with resolution tags) or ``""``.
    """

    axes: str | None = None
    scale: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    rgb: bool = False
    kind: str = ""

    @property
    def has_metadata(self) -> bool:
        return bool(self.scale) or self.kind in ("imagej", "ome")

    def for_axes(self, axes: str) -> ImageMeta:
        """The same metadata for an image of ``axes`` (sizes of axes it lacks dropped)."""
        keep = set(axes.upper())
        return ImageMeta(axes.upper(), {k: v for k, v in self.scale.items() if k in keep},
                         {k: v for k, v in self.units.items() if k in keep},
                         self.rgb and "C" in keep, self.kind)

    def to_dict(self) -> dict:
        return {"axes": self.axes, "scale": dict(self.scale), "units": dict(self.units),
                "rgb": self.rgb, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict | None) -> ImageMeta:
        d = d or {}
        return cls(d.get("axes"), dict(d.get("scale") or {}), dict(d.get("units") or {}),
                   bool(d.get("rgb")), str(d.get("kind") or ""))


def _map_axes(tf_axes: str, declared: bool) -> str | None:
    """tifffile's axes of a series -> ours, or None when they say nothing we can use."""
    if not declared and not ("S" in tf_axes and tf_axes.replace("S", "") in ("YX", "QYX", "IYX")):
        return None  # a plain TIFF declares no axes (except colour samples)
    letters = dict(_TIFFFILE_LETTERS)
    if "S" in tf_axes.upper() and "C" in tf_axes.upper():
        letters["C"] = "S"  # an RGB hyperstack (ImageJ's CYXS): the colours are the channels
    out = "".join(letters.get(a, "?") for a in tf_axes.upper())
    extra = [a for a in out if a == "?"]
    if len(extra) == 1:
        out = out.replace("?", "S")
    if "?" in out or len(set(out)) != len(out) or not out.endswith(("YX", "YXC")):
        return None
    return out


def _um(value: float, unit: str | None) -> tuple[float, str]:
    """(size, unit) with lengths in µm where the unit is known."""
    u = (unit or "").strip()
    factor = _LENGTH_UM.get(u.lower(), _LENGTH_UM.get(u))
    if factor is None:
        return float(value), u
    return float(value) * factor, "µm"


def _resolution(page) -> tuple[float | None, float | None, int]:
    tags = page.tags
    out = []
    for name in ("YResolution", "XResolution"):
        t = tags.get(name)
        if t is None:
            out.append(None)
            continue
        num, den = t.value if isinstance(t.value, tuple) else (t.value, 1)
        out.append(den / num if num else None)  # pixels per unit -> units per pixel
    unit = tags.get("ResolutionUnit")
    return out[0], out[1], int(unit.value) if unit is not None else 1


def _imagej_meta(tif, meta: ImageMeta) -> None:
    ij = tif.imagej_metadata or {}
    unit = ij.get("unit")
    py, px, _ = _resolution(tif.pages[0])
    for axis, size in (("Y", py), ("X", px)):
        if size is not None and unit and size != 1.0:
            meta.scale[axis], meta.units[axis] = _um(size, unit)
    if ij.get("spacing") and unit:
        meta.scale["Z"], meta.units["Z"] = _um(float(ij["spacing"]), unit)
    if ij.get("finterval"):
        meta.scale["T"], meta.units["T"] = float(ij["finterval"]), "s"


def _ome_meta(tif, series: int, meta: ImageMeta) -> None:
    import tifffile

    try:
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
        image = ome["Image"]
        image = image[series] if isinstance(image, list) else image
        pixels = image["Pixels"]
    except (KeyError, IndexError, TypeError, ValueError):
        return
    for axis in ("X", "Y", "Z"):
        size = pixels.get(f"PhysicalSize{axis}")
        if size:
            meta.scale[axis], meta.units[axis] = _um(float(size), pixels.get(
                f"PhysicalSize{axis}Unit", "µm"))
    if pixels.get("TimeIncrement"):
        meta.scale["T"] = float(pixels["TimeIncrement"])
        meta.units["T"] = str(pixels.get("TimeIncrementUnit", "s"))


def _plain_meta(page, meta: ImageMeta) -> None:
    py, px, unit = _resolution(page)
    per = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre -> µm
    if per is None:
        return  # no unit: the resolution says nothing physical
    for axis, size in (("Y", py), ("X", px)):
        if size is not None:
            meta.scale[axis], meta.units[axis] = size * per, "µm"


def _check_file(path, what: str) -> Path:
    """``path`` once it is known to be a regular file (:func:`~.safeio.check_input_file`: a
    FIFO is never opened, a folder, a device or a symbolic link loop is refused in one line)."""
    from ..files.safeio import check_input_file

    return check_input_file(path, what, "TIFF file", InputError)


#: series shapes named in the message about a TIFF with several
_SHOWN_SERIES = 4


def _series(tif, p: Path, what: str, series: int | None):
    """The one image series of ``tif`` to read: ``series``, or the only one there is.

    A TIFF with several series (positions of a multi-position acquisition, images of different
    sizes, series a writer appended) is refused without ``series``: reading the first of them
    would silently leave the others out, and napari-hdn reads one image per file."""
    n = len(tif.series)
    if n == 0:
        raise InputError(f"{what} {p} holds no image (a TIFF without pages): give a TIFF with an "
                         "image in it")
    if series is None:
        if n > 1:
            shapes = [tuple(int(v) for v in s.shape) for s in tif.series]
            listed = ", ".join("x".join(map(str, sh)) for sh in shapes[:_SHOWN_SERIES])
            listed += ", ..." if n > _SHOWN_SERIES else ""
            same = (" (if they are frames of one stack, save them as one stack)"
                    if len(set(shapes)) == 1 else "")
            raise InputError(
                f"{what} {p} holds {n} image series ({listed}) and napari-hdn reads one image per "
                f"file: save the series you want as a TIFF of its own{same}, e.g. in Python "
                f"tifffile.imwrite('one.tif', tifffile.imread('{p.name}', series=K))")
        series = 0
    if not 0 <= int(series) < n:
        raise InputError(f"{what} {p} has no series {series}: it holds {n} (0 to {n - 1})")
    s = tif.series[int(series)]
    shape = tuple(int(v) for v in s.shape)
    if len(shape) < 2 or 0 in shape:
        raise InputError(f"{what} {p} holds no image (its pixels have the shape {shape}): give a "
                         "TIFF with an image in it")
    return int(series), s


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile's complaints about a damaged file go to its logger as lines of their own; the
    error raised says what is wrong in one line, so they are held back while a file is read."""
    log = logging.getLogger("tifffile")
    old = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old)


def read_tiff_meta(path: str | os.PathLike, what: str = "input",
                   series: int | None = None) -> tuple[tuple, np.dtype, ImageMeta]:
    """(shape, dtype, metadata) of the image of a TIFF, without reading its pixels.

    The file must hold one image series, or ``series`` picks one (see :func:`read_tiff`).
    Photometric RGB samples are the channel axis C wherever the file stores them: interleaved
    (axes YXC) or in separate planes (``planarconfig`` separate: axes CYX, one plane a
    channel, not three frames)."""
    import tifffile

    p = _check_file(path, what)
    try:
        with _quiet_tifffile(), tifffile.TiffFile(p) as tif:
            k, s = _series(tif, p, what, series)
            page = s.keyframe
            meta = ImageMeta(kind="imagej" if tif.is_imagej else "ome" if tif.is_ome else "tiff")
            meta.axes = _map_axes(s.axes, tif.is_imagej or tif.is_ome)
            meta.rgb = page.photometric == 2 and meta.axes is not None and "C" in meta.axes
            if tif.is_imagej:
                _imagej_meta(tif, meta)
            elif tif.is_ome:
                _ome_meta(tif, k, meta)
            else:
                _plain_meta(page, meta)
            return tuple(int(v) for v in s.shape), np.dtype(s.dtype), meta
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's problem
        raise InputError(f"could not read {what} {p} as a TIFF image ({exc})") from None


def read_tiff(path: str | os.PathLike, what: str = "input", lazy: bool = False,
              series: int | None = None):
    """``(data, meta)`` of the image of a TIFF file.

    ``lazy``: a file whose pixels take more than :data:`LAZY_BYTES` comes back as a
    :class:`~.frames.TiffPages` (read on demand) instead of an array. ``series``: which image
    series of a file with several to read; without it such a file is refused
    (:class:`InputError` naming the series and their shapes), never read as its first series.

    Raises
    ------
    InputError
        One line: the path is not a regular file (a FIFO, a folder, a device, a symbolic link
        loop, empty: never opened), the file is no TIFF or holds no image, or several series.
    """
    import tifffile

    from .frames import TiffPages

    shape, dtype, meta = read_tiff_meta(path, what, series)
    p = Path(path)
    k = series or 0
    try:
        if lazy and int(np.prod(shape)) * dtype.itemsize > LAZY_BYTES:
            return TiffPages(p, k), meta
        with _quiet_tifffile(), tifffile.TiffFile(p) as tif:
            return np.asarray(tif.series[k].asarray()), meta
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"could not read {what} {p} as a TIFF image ({exc})") from None


#: our letters -> OME-TIFF's (tifffile's); a leading sample axis of the samples file is "Q" (or
#: "E" when the image already has frames of no named kind)
_OME_LETTERS = {"T": "T", "Z": "Z", "C": "C", "S": "Q", "Y": "Y", "X": "X"}


def _ome_axes(axes: str) -> str:
    out = "".join(_OME_LETTERS.get(a, a) for a in axes)
    if out.endswith("YXC"):
        out = out[:-1] + "S"  # colour samples, interleaved
    return out


def write_tiff(path: str | os.PathLike, array, axes: str, meta: ImageMeta | None = None,
               description: dict | None = None, sample_axis: bool = False):
    """Write ``array`` (axes ``axes``, our letters) with ``meta``'s pixel sizes, atomically.

    With metadata (the input had axes or a pixel size) the file is an OME-TIFF: axes, physical
    sizes and units in the OME-XML, our ``description`` (JSON) as its description, the X/Y
    resolution in the TIFF tags too. Without, a plain TIFF with the JSON description.
    ``sample_axis``: ``array`` has one more leading axis than ``axes`` (posterior samples).
    """
    from ..files.safeio import write_tiff as write_plain

    arr = np.asarray(array)
    axes = axes.upper()
    text = json.dumps(description) if description is not None else None
    rgb = axes.endswith("YXC") and arr.shape[-1] in (3, 4)
    if meta is None or not meta.has_metadata:
        kw = {"photometric": "rgb" if rgb else "minisblack"}
        if text is not None:
            kw["description"] = text
        return write_plain(path, arr, **kw)
    ome = _ome_axes(axes)
    if sample_axis:
        ome = ("E" if "Q" in ome else "Q") + ome
    md: dict = {"axes": ome}
    units = meta.units
    for axis in ("X", "Y", "Z"):
        if axis in meta.scale and axis in axes:
            md[f"PhysicalSize{axis}"] = float(meta.scale[axis])
            md[f"PhysicalSize{axis}Unit"] = units.get(axis, "µm")
    if "T" in meta.scale and "T" in axes:
        md["TimeIncrement"] = float(meta.scale["T"])
        md["TimeIncrementUnit"] = units.get("T", "s")
    if text is not None:
        md["Description"] = text
    kw = {"ome": True, "metadata": md, "photometric": "rgb" if rgb else "minisblack"}
    if "X" in meta.scale and "Y" in meta.scale and units.get("X") == "µm":
        kw["resolution"] = (1e4 / meta.scale["X"], 1e4 / meta.scale["Y"])  # pixels per cm
        kw["resolutionunit"] = "CENTIMETER"
    return write_plain(path, arr, **kw)


def hdn_description(path: str | os.PathLike) -> dict:
    """The JSON napari-hdn wrote with a result file (OME description or TIFF description)."""
    import tifffile

    with tifffile.TiffFile(_check_file(path, "result")) as tif:
        text = tif.pages[0].description or ""
        if tif.is_ome:
            try:
                image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
                image = image[0] if isinstance(image, list) else image
                text = image.get("Description", "")
            except (KeyError, TypeError, ValueError):
                text = ""
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def scale_for(meta: ImageMeta | None, axes: str) -> tuple[float, ...]:
    """napari's ``scale`` for an image of ``axes``: the physical size of Z, Y and X where the
    file gives it, 1 elsewhere."""
    meta = meta or ImageMeta()
    return tuple(float(meta.scale.get(a, 1.0)) if a in "ZYX" else 1.0 for a in axes.upper())


# -- napari layers -----------------------------------------------------------------------------------

#: napari axis labels (those napari-hdn's result layers get, and common ones) -> our letters
_LABEL_LETTERS = {"t": "T", "time": "T", "z": "Z", "c": "C", "channel": "C", "y": "Y", "x": "X",
                  "frame": "S", "s": "S", "sample": "S"}
_TIME_UNITS = {"second": "s", "millisecond": "ms", "minute": "min", "hour": "h"}


def meta_from_layer(layer_meta: dict, ndim: int) -> tuple[str, ImageMeta, bool]:
    """``(axes, metadata, sample_axis)`` of a napari image layer's state (a writer's ``meta``)
    whose data have ``ndim`` dimensions: axes from its axis labels (napari's defaults: guessed
    from the dimensions), physical sizes from its scale and units (a scale in napari's default
    unit, pixels, is taken as µm: it is what a scale of a microscopy layer means).
    ``sample_axis``: a leading "sample" axis (posterior samples), left out of ``axes``."""
    from .arrays import default_axes

    rgb = bool(layer_meta.get("rgb"))
    space = ndim - (1 if rgb else 0)  # napari's dimensions (an RGB layer's colours are not one)
    labels = [str(v).lower() for v in (layer_meta.get("axis_labels") or ())][-space:]
    letters = [_LABEL_LETTERS.get(v) for v in labels]
    sample = labels[:1] == ["sample"]
    if sample:
        letters = letters[1:]
    if len(letters) != space - sample or None in letters or len(set(letters)) != len(letters):
        n = space - sample
        letters = list(default_axes(n)) if n <= 5 else ["S"] * (n - 2) + ["Y", "X"]
    axes = "".join(letters) + ("C" if rgb else "")
    meta = ImageMeta(axes, kind="ome", rgb=rgb)
    scale = list(layer_meta.get("scale") or [1.0] * space)[-space:][int(sample):]
    units = [str(u) for u in (layer_meta.get("units") or ["pixel"] * space)][-space:][int(sample):]
    for letter, size, unit in zip(letters, scale, units):
        if letter in "ZYX" and (float(size) != 1.0 or unit not in ("pixel", "")):
            meta.scale[letter], meta.units[letter] = _um(
                float(size), "µm" if unit == "pixel" else unit)
        elif letter == "T" and unit in _TIME_UNITS:
            meta.scale["T"], meta.units["T"] = float(size), _TIME_UNITS[unit]
    return axes, meta, sample


def write_ome_zarr(path: str | os.PathLike, array, axes: str, meta: ImageMeta | None = None,
                   description: dict | None = None, name: str = "image") -> Path:
    """Write ``array`` as an OME-Zarr image (NGFF 0.4, one resolution level) with its axes and
    physical sizes. NGFF orders axes time, channel, space: a channel axis that comes last (RGB)
    is moved before Y and X. Written to a temporary folder, renamed when complete."""
    import secrets
    import shutil

    import zarr

    from ..errors import OutputError

    arr = np.asarray(array)
    axes = axes.upper()
    if axes.endswith("YXC"):
        arr, axes = np.moveaxis(arr, -1, -3), axes[:-3] + "CYX"
    order = {"T": 0, "S": 1, "C": 1, "Z": 2, "Y": 3, "X": 4}
    if [order[a] for a in axes] != sorted(order[a] for a in axes) or \
            sum(a in "SC" for a in axes) > 1 or arr.ndim > 5:
        raise OutputError(f"{path}: OME-Zarr (NGFF 0.4) takes axes in the order T, C, Z, Y, X; "
                          f"these are {axes}: save as OME-TIFF (.ome.tif) instead")
    meta = meta or ImageMeta()
    kinds = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
    ax_meta = []
    for a in axes:
        entry = {"name": a.lower() if a != "S" else "frame"}
        if a in kinds:
            entry["type"] = kinds[a]
        if a in meta.scale and a in "ZYX":
            entry["unit"] = "micrometer"
        if a == "T" and "T" in meta.scale:
            entry["unit"] = {"s": "second", "ms": "millisecond", "min": "minute",
                             "h": "hour"}.get(meta.units.get("T", "s"), "second")
        ax_meta.append(entry)
    scale = [float(meta.scale.get(a, 1.0)) if a in "TZYX" else 1.0 for a in axes]
    target = Path(path)
    if target.exists():
        raise OutputError(f"{target} exists: remove it or give another name")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        chunks = tuple([1] * (arr.ndim - 2) + [min(512, arr.shape[-2]), min(512, arr.shape[-1])])
        root.create_array("0", shape=arr.shape, dtype=arr.dtype, chunks=chunks)[...] = arr
        attrs = {"multiscales": [{"version": "0.4", "name": name, "axes": ax_meta,
                                  "datasets": [{"path": "0", "coordinateTransformations": [
                                      {"type": "scale", "scale": scale}]}]}]}
        if description is not None:
            attrs["napari_hdn"] = description
        root.attrs.update(attrs)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        from ..files.safeio import write_failure

        raise OutputError(write_failure(exc, target)) from None
    return target


def read_zarr_meta(path: str | os.PathLike) -> tuple[str | None, ImageMeta]:
    """(axes, metadata) of an OME-Zarr image written by :func:`write_ome_zarr` (or another NGFF
    0.4 / 0.5 writer): the axes and the scale of the full-resolution level."""
    import zarr

    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if not ms:
        return None, ImageMeta()
    m0 = ms[0]
    names = [a["name"] if isinstance(a, dict) else a for a in m0.get("axes", [])]
    axes = "".join(_LABEL_LETTERS.get(str(n).lower(), "?") for n in names)
    meta = ImageMeta(axes if "?" not in axes else None, kind="ome")
    for t in m0["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            for a, v, ax in zip(axes, t["scale"], m0.get("axes", [])):
                unit = ax.get("unit") if isinstance(ax, dict) else None
                if a in "ZYX" and unit:
                    meta.scale[a], meta.units[a] = _um(float(v), unit)
                elif a == "T" and unit:
                    meta.scale["T"], meta.units["T"] = float(v), _TIME_UNITS.get(unit, unit)
    return meta.axes, meta
