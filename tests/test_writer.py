"""The npe2 writers (napari_hdn/_writer.py): image layers as OME-TIFF / OME-Zarr with their
axes, scale and units."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_hdn._writer import write_ome_tiff, write_ome_zarr
from napari_hdn.engine.data.imageio import hdn_description, read_tiff_meta, read_zarr_meta


def _state(**kw):
    base = {"name": "HDN MMSE · cells", "scale": [1.0, 0.25, 0.25], "rgb": False,
            "axis_labels": ("T", "y", "x"), "units": ("second", "micrometer", "micrometer"),
            "metadata": {"hdn": {"output": "mmse", "n_samples": 8}}}
    base.update(kw)
    return base


def test_ome_tiff_writer_keeps_axes_scale_units_and_settings(tmp_path):
    data = np.random.default_rng(0).normal(size=(3, 32, 40)).astype(np.float32)
    [path] = write_ome_tiff(str(tmp_path / "mmse.ome.tif"), data, _state(scale=[2.0, 0.25, 0.25]))
    shape, _, meta = read_tiff_meta(path)
    assert shape == (3, 32, 40) and meta.axes == "TYX" and meta.kind == "ome"
    assert meta.scale == {"X": 0.25, "Y": 0.25, "T": 2.0} and meta.units["X"] == "µm"
    assert hdn_description(path)["napari_hdn"]["n_samples"] == 8
    np.testing.assert_array_equal(tifffile.imread(path), data)


def test_writer_takes_napari_pixels_as_micrometres_and_samples_and_rgb(tmp_path):
    # a scale in napari's default unit (pixels): the sizes of a microscopy layer, in µm
    samples = np.zeros((4, 2, 16, 16), np.float32)
    st = _state(scale=[1.0, 1.0, 0.5, 0.5], axis_labels=("sample", "C", "y", "x"),
                units=("pixel",) * 4)
    [path] = write_ome_tiff(str(tmp_path / "samples.ome.tif"), samples, st)
    shape, _, meta = read_tiff_meta(path)
    assert shape == (4, 2, 16, 16) and meta.axes == "SCYX" and meta.scale["Y"] == 0.5
    rgb = np.zeros((16, 16, 3), np.float32)
    [path] = write_ome_tiff(str(tmp_path / "rgb"), rgb, _state(scale=[0.5, 0.5], rgb=True,
                                                               axis_labels=("y", "x"),
                                                               units=("pixel", "pixel")))
    assert path.endswith(".ome.tif")
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "YXS" and tif.pages[0].photometric == 2


def test_ome_zarr_writer_round_trips_the_scale(tmp_path):
    pytest.importorskip("zarr")
    data = np.random.default_rng(1).normal(size=(2, 24, 24)).astype(np.float32)
    st = _state(axis_labels=("C", "y", "x"), units=("pixel", "micrometer", "micrometer"))
    [path] = write_ome_zarr(str(tmp_path / "mmse.ome.zarr"), data, st)
    axes, meta = read_zarr_meta(path)
    assert axes == "CYX" and meta.scale == {"Y": 0.25, "X": 0.25}
    from napari_hdn.engine.data.lazy import open_array

    lazy = open_array(path, channel=1)  # the chunked prediction's reader sees the axes too
    assert lazy.axes == "YX"
    np.testing.assert_array_equal(np.asarray(lazy.array), data[1])
    # NGFF puts the channel axis before space: an RGB layer's colours move there
    rgb = np.zeros((8, 8, 3), np.float32)
    [path] = write_ome_zarr(str(tmp_path / "rgb.ome.zarr"), rgb,
                            _state(rgb=True, axis_labels=("y", "x"), scale=[1, 1]))
    assert read_zarr_meta(path)[0] == "CYX"


def test_viewer_saves_a_result_layer_with_the_plugin(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.ones((2, 16, 16), np.float32), name="HDN MMSE · x",
                             scale=(1, 0.3, 0.3), axis_labels=("Z", "y", "x"),
                             units=("micrometer",) * 3, metadata={"hdn": {"output": "mmse"}})
    viewer.layers.selection = {layer}
    out = tmp_path / "saved.ome.tif"
    viewer.layers.save(str(out), selected=True, plugin="napari-hdn")
    _, _, meta = read_tiff_meta(out)
    assert meta.axes == "ZYX" and meta.scale["X"] == pytest.approx(0.3)
    assert meta.scale["Z"] == pytest.approx(1.0)
