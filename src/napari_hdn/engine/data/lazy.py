"""Images read lazily, as dask arrays: zarr and OME-Zarr stores (their full-resolution level),
arrays inside stores, TIFFs read region by region, and in-memory arrays; with the axes their
metadata declare and one channel picked. dask and zarr are optional (the ``cluster`` extra)."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HDNError, HDNWarning, InputError

#: output chunk side (pixels), the default of every entry point of chunked prediction
DEFAULT_TILE = 512


class MissingDependency(HDNError, ImportError):
    """An optional package (dask, zarr, distributed) is needed for this and is not installed."""


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = module.split(".")[0]
        raise MissingDependency(
            f"{pkg} is not installed and is needed for large data and clusters: "
            "pip install 'napari-hdn[cluster]' (dask[array], zarr, distributed)"
        ) from None


# -- lazy input ------------------------------------------------------------------------------------


class LazyTiff:
    """A TIFF series read region by region (tifffile's zarr store), pickled as its path so that
    cluster workers open the file themselves."""

    def __init__(self, path: str, series: int = 0):
        import tifffile

        self.path, self.series = str(path), int(series)
        with tifffile.TiffFile(self.path) as tif:
            s = tif.series[self.series]
            self.shape, self.dtype = tuple(s.shape), np.dtype(s.dtype)
            self.axes = s.axes.upper()
            self.declared = bool(tif.is_imagej or tif.is_ome)
        self.ndim = len(self.shape)
        self._arr = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_arr"} | {"_arr": None}

    def __getitem__(self, key):
        if self._arr is None:
            import tifffile
            import zarr

            store = tifffile.imread(self.path, aszarr=True, series=self.series)
            self._arr = zarr.open_array(store, mode="r")
        return np.asarray(self._arr[key])


_OME_LETTERS = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


def _ome_axes(attrs: dict, where="the store") -> tuple[str | None, str]:
    """(axes, path of the full-resolution array) from OME-Zarr multiscales metadata; metadata
    without a dataset path are refused (:class:`InputError`)."""
    ome = attrs.get("ome")
    ms = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict) else None)
    if not ms:
        return None, ""
    try:
        m0 = ms[0]
        path = str(m0["datasets"][0]["path"])
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{where} has OME-Zarr multiscales metadata without a dataset path: the "
                         "metadata are damaged; give an array's path inside the store") from None
    axes = m0.get("axes")
    if not axes:
        return None, path
    names = [a["name"] if isinstance(a, dict) else a for a in axes]
    letters = "".join(_OME_LETTERS.get(str(n).lower(), "?") for n in names)
    return letters, path


@dataclass
class LazyInput:
    """A lazily read image: a dask array, its axes (None: guess from the shape), a name."""

    array: object
    axes: str | None
    name: str


def _select_channel(arr, axes: str | None, channel: int | None, name: str):
    if not axes or "C" not in axes:
        if channel is not None:
            raise InputError(f"{name} has no channel axis; leave the channel out")
        return arr, axes
    c = axes.index("C")
    n = arr.shape[c]
    if channel is None:
        if n != 1:
            raise InputError(
                f"{name} has {n} channels (axes {axes}): HDN restores one channel at a time; "
                "choose one (--channel K on the command line, channel=K in Python)")
        channel = 0
    if not 0 <= channel < n:
        raise InputError(f"channel {channel} does not exist in {name} ({n} channels, 0..{n - 1})")
    idx = [slice(None)] * arr.ndim
    idx[c] = channel
    return arr[tuple(idx)], axes.replace("C", "")


def open_array(source, axes: str | None = None, channel: int | None = None,
               chunks: int = DEFAULT_TILE) -> LazyInput:
    """Open an image lazily as a dask array.

    ``source``: a dask array, a numpy array, a zarr array, or the path of a zarr store (a plain
    array, a group holding one array, or an OME-Zarr image: its full-resolution level), of a zarr
    array inside a store (``BIG.zarr/raw``), or of a TIFF (read region by region through
    tifffile's zarr store; compressed TIFFs decode whole strips or tiles). Axes declared by
    OME-Zarr, ImageJ/OME-TIFF or xarray (``_ARRAY_DIMENSIONS``) metadata are used when ``axes`` is
    not given; a channel axis is reduced to ``channel``.
    """
    da = _need("dask.array")
    name = "image"
    declared = None
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        name = str(p)
        if p.suffix.lower() in (".tif", ".tiff"):
            from .imageio import read_tiff_meta

            # a regular file (never a FIFO opened), one image series, RGB planes as channels C
            declared = read_tiff_meta(p)[2].axes
            t = LazyTiff(str(p))
            if declared:
                if declared.endswith("YXC"):  # RGB samples last
                    raise InputError(f"{p} is an RGB(A) TIFF: HDN restores one channel at a time")
            arr = da.from_array(t, chunks=_chunks_for(t.shape, chunks), asarray=False,
                                name=f"tiff-{hashlib.sha1(name.encode()).hexdigest()[:12]}")
        else:
            if not p.exists():
                raise InputError(f"input not found: {p}")
            zarr = _need("zarr")
            try:
                node = zarr.open(str(p), mode="r")
            except Exception as exc:  # noqa: BLE001 - any reader failure is the file's problem
                raise InputError(f"could not open {p} as a zarr store ({exc})") from None
            if isinstance(node, zarr.Group):
                ome, path = _ome_axes(dict(node.attrs), p)
                if path:
                    try:
                        held_path = path in node
                    except (KeyError, ValueError):  # a path zarr refuses ('..', absolute)
                        held_path = False
                    if not held_path:
                        held = sorted(k for k, _ in node.arrays())
                        raise InputError(
                            f"{p} is an OME-Zarr image whose metadata name the full-resolution "
                            f"dataset {path!r}, which the store does not hold (it holds "
                            f"{', '.join(held) or 'no array'}): the store is incomplete or was "
                            f"edited; give an array's path, e.g. {p}/{held[0] if held else 'NAME'}")
                    node, declared = node[path], ome
                else:
                    arrays = [k for k, _ in node.arrays()]
                    if len(arrays) != 1:
                        raise InputError(
                            f"{p} is a zarr group with {len(arrays)} arrays ({', '.join(arrays)}) "
                            f"and no OME-Zarr metadata: give the array's path, e.g. {p}/"
                            f"{arrays[0] if arrays else 'NAME'}")
                    node = node[arrays[0]]
            if declared is None:
                dims = getattr(node.metadata, "dimension_names", None) or \
                    node.attrs.get("_ARRAY_DIMENSIONS")
                if dims and all(dims):
                    declared = "".join(_OME_LETTERS.get(str(d).lower(), "?") for d in dims)
            _check_chunks_stored(node, name)
            arr = da.from_zarr(node)
    elif isinstance(source, da.Array):
        arr = source
    else:
        try:
            import zarr

            if isinstance(source, zarr.Array):
                _check_chunks_stored(source, "the zarr array")
                source = da.from_zarr(source)
        except ImportError:
            pass
        arr = source if isinstance(source, da.Array) else da.from_array(
            np.asarray(source), chunks=_chunks_for(np.shape(source), chunks))
    if declared and "?" in declared:
        declared = None
    arr, declared = _select_channel(arr, axes.upper() if axes and "C" in axes.upper() else declared,
                                    channel, name)
    if axes and "C" in axes.upper():
        axes = axes.upper().replace("C", "")
    if 0 in tuple(arr.shape) or arr.ndim < 2:
        raise InputError(f"{name} holds no image (its shape is {tuple(arr.shape)}): give an array "
                         "with at least one frame of rows and columns")
    return LazyInput(arr, axes or declared, name)


class MissingChunksWarning(HDNWarning):
    """Chunks of a zarr input are not stored: zarr reads them as the array's fill value."""


def _check_chunks_stored(node, name: str) -> None:
    """Warn when chunks of the zarr array ``node`` are not in its store. zarr reads a missing
    chunk as the fill value, silently: a store that was not completely written (a copy cut
    short, a writer that died) looks like an image with blocks of zeros. A writer may also leave
    out chunks that hold only the fill value (zarr's ``write_empty_chunks=False``), so this is a
    warning, not a refusal. Listing the store costs one directory listing per array."""
    try:
        total, stored = int(node.nchunks), int(node.nchunks_initialized)
    except Exception:  # noqa: BLE001 - a store that cannot list its keys: nothing to say
        return
    if stored >= total:
        return
    missing = total - stored
    warnings.warn(
        f"{name}: {missing} of its {total} chunks ({missing / total:.0%}) are not stored, and zarr "
        f"reads them as the fill value {node.fill_value}: if the store was not completely written "
        "or copied, those regions of the result are of fill-value pixels, not of the image; "
        "check the store (zarr's write_empty_chunks=False leaves out chunks of fill value alone, "
        "which is harmless)", MissingChunksWarning, stacklevel=4)


def _chunks_for(shape, tile: int) -> tuple:
    return tuple([1] * (len(shape) - 2) + [min(tile, shape[-2]), min(tile, shape[-1])])
