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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

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
    out = "".join(_TIFFFILE_LETTERS.get(a, "?") for a in tf_axes.upper())
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


def _plain_meta(tif, meta: ImageMeta) -> None:
    py, px, unit = _resolution(tif.pages[0])
    per = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre -> µm
    if per is None:
        return  # no unit: the resolution says nothing physical
    for axis, size in (("Y", py), ("X", px)):
        if size is not None:
            meta.scale[axis], meta.units[axis] = size * per, "µm"


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a TIFF file")


def read_tiff_meta(path: str | os.PathLike, what: str = "input") -> tuple[tuple, np.dtype, ImageMeta]:
    """(shape, dtype, metadata) of the first series of a TIFF, without reading its pixels."""
    import tifffile

    p = Path(path)
    _check_file(p, what)
    try:
        with tifffile.TiffFile(p) as tif:
            s = tif.series[0]
            meta = ImageMeta(kind="imagej" if tif.is_imagej else "ome" if tif.is_ome else "tiff")
            meta.axes = _map_axes(s.axes, tif.is_imagej or tif.is_ome)
            meta.rgb = tif.pages[0].photometric == 2 and meta.axes is not None and "C" in meta.axes
            if tif.is_imagej:
                _imagej_meta(tif, meta)
            elif tif.is_ome:
                _ome_meta(tif, 0, meta)
            else:
                _plain_meta(tif, meta)
            return tuple(int(v) for v in s.shape), np.dtype(s.dtype), meta
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's problem
        raise InputError(f"could not read {what} {p} as a TIFF image ({exc})") from None


def read_tiff(path: str | os.PathLike, what: str = "input", lazy: bool = False):
    """``(data, meta)`` of the first series of a TIFF file.

    ``lazy``: a file whose pixels take more than :data:`LAZY_BYTES` comes back as a
    :class:`~.frames.TiffPages` (read on demand) instead of an array.
    """
    import tifffile

    from .frames import TiffPages

    shape, dtype, meta = read_tiff_meta(path, what)
    p = Path(path)
    try:
        if lazy and int(np.prod(shape)) * dtype.itemsize > LAZY_BYTES:
            return TiffPages(p), meta
        with tifffile.TiffFile(p) as tif:
            return np.asarray(tif.series[0].asarray()), meta
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
    from .safeio import write_tiff as write_plain

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

    with tifffile.TiffFile(path) as tif:
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
