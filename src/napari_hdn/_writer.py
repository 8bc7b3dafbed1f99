"""npe2 writers: an image layer (an HDN MMSE, variance or samples layer, or any other) as
OME-TIFF, or as OME-Zarr (with the ``cluster`` extra's zarr), with the layer's axes, scale and
units (File > Save Selected Layer(s), choosing "napari-hdn" and a ``.ome.tif`` or ``.ome.zarr``
name). The settings napari-hdn keeps in a result layer's ``metadata["hdn"]`` go with it."""

from __future__ import annotations

import os


def _prepare(data, meta: dict):
    import numpy as np

    from .engine.data.imageio import meta_from_layer

    arr = np.asarray(data)
    axes, info, sample = meta_from_layer(meta, arr.ndim)
    hdn = (meta.get("metadata") or {}).get("hdn")
    desc = {"layer": meta.get("name"), **({"napari_hdn": hdn} if hdn else {})}
    return arr, axes, info, sample, desc


def write_ome_tiff(path: str, data, meta: dict) -> list[str]:
    """Write one image layer as OME-TIFF; returns the path written (napari's writer contract)."""
    from .engine.data.imageio import write_tiff

    arr, axes, info, sample, desc = _prepare(data, meta)
    p = os.fspath(path)
    if not p.lower().endswith((".tif", ".tiff")):
        p += ".ome.tif"
    write_tiff(p, arr, axes, info, desc, sample_axis=sample)  # OME even without sizes
    return [p]


def write_ome_zarr(path: str, data, meta: dict) -> list[str]:
    """Write one image layer as an OME-Zarr image (NGFF 0.4); returns the path written."""
    from .engine.data.imageio import write_ome_zarr as write

    arr, axes, info, sample, desc = _prepare(data, meta)
    if sample:  # NGFF has no axis for posterior samples: a custom axis "frame" before Y, X
        axes = "S" + axes
    p = os.fspath(path)
    if not p.lower().endswith(".zarr"):
        p += ".ome.zarr"
    write(p, arr, axes, info, desc, name=str(meta.get("name") or "image"))
    return [p]
