"""Out-of-core prediction: dask arrays, zarr / OME-Zarr / TIFF inputs, chunked zarr output with
resume, and a dask.distributed LocalCluster."""

import numpy as np
import pytest
import tifffile
from _helpers import smooth_image

pytest.importorskip("zarr")
da = pytest.importorskip("dask.array")

import zarr  # noqa: E402

from napari_hdn.cli import main  # noqa: E402
from napari_hdn.engine import InputError, OutputError, StopFlag, predict  # noqa: E402
from napari_hdn.engine.data.lazy import open_array  # noqa: E402
from napari_hdn.engine.prediction import chunked as L  # noqa: E402

KW = dict(n_samples=3, seed=1, tile_size=32, margin=32)


def _stack(frames=2, shape=(72, 60)):
    rng = np.random.default_rng(0)
    return np.stack([smooth_image(shape, k) + rng.normal(0, 10, shape).astype(np.float32)
                     for k in range(frames)])


@pytest.fixture
def model_file(tiny_model, tmp_path):
    return tiny_model.save(tmp_path / "m.hdn")


def test_lazy_chunks_equal_in_memory_prediction(tiny_model):
    img = _stack()
    full = predict(tiny_model, img, n_samples=3, seed=1, axes="TYX", return_samples=True)
    x = da.from_array(img, chunks=(1, 40, 40))
    lazy = L.predict_dask(tiny_model, x, axes="TYX", return_samples=True, **KW)
    assert isinstance(lazy.mmse, da.Array) and lazy.mmse.shape == img.shape
    assert lazy.info["chunks"] == 2 * 3 * 2  # frames x 3 x 2 chunks of 32
    out = da.compute(lazy.mmse, lazy.variance, lazy.samples, scheduler="sync")
    # the 32-pixel margin covers the tiny model's receptive field: equal to float32 rounding
    for got, want in zip(out, (full.mmse, full.variance, full.samples)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # a margin that is too small is visibly different: the comparison can fail
    rough = L.predict_dask(tiny_model, x, axes="TYX", n_samples=3, seed=1, tile_size=32, margin=0)
    assert np.abs(rough.mmse.compute(scheduler="sync") - full.mmse).max() > 1e-2


def test_zarr_store_resumes_only_missing_chunks(model_file, tmp_path, tiny_model):
    img = _stack()
    src = tmp_path / "in.zarr"
    z = zarr.open_array(str(src), mode="w", shape=img.shape, chunks=(1, 50, 50), dtype="float32",
                        dimension_names=["t", "y", "x"])
    z[:] = img
    full = predict(tiny_model, img, n_samples=3, seed=1, axes="TYX")
    out = tmp_path / "out.zarr"
    stop, seen = StopFlag(), []

    def stop_after_5(ev):
        seen.append(ev)
        if ev.kind == "step" and ev.step == 5:
            stop.set()  # as a kill would: 5 chunks written, the others not

    res = L.predict_to_zarr(model_file, src, out, callbacks=stop_after_5, stop_flag=stop, **KW)
    assert res.info["stopped"] and res.info["chunks_done"] == 5 and res.info["axes"] == "TYX"
    # a chunk whose data were written but not marked done (killed in between) is computed again
    g = zarr.open_group(str(out), mode="r+")
    g["mmse"][0, 32:64, 32:60] = -1.0
    g["done"][0, 1, 1] = 0
    res = L.predict_to_zarr(model_file, src, out, **KW)
    assert res.info["resumed"] and res.info["chunks_before"] == 4
    assert res.info["chunks_run"] == 12 - 4 and res.info["chunks_done"] == 12
    np.testing.assert_allclose(res.mmse.compute(), full.mmse, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(res.variance.compute(), full.variance, rtol=1e-3, atol=1e-3)
    # a finished store: nothing to do; other settings are refused (not silently mixed)
    assert L.predict_to_zarr(model_file, src, out, **KW).info["chunks_run"] == 0
    with pytest.raises(OutputError, match="other settings .samples differ"):
        L.predict_to_zarr(model_file, src, out, **{**KW, "n_samples": 4})
    with pytest.raises(OutputError, match="is the input"):
        L.predict_to_zarr(model_file, src, src, **KW)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="not a napari-hdn prediction store"):
        L.predict_to_zarr(model_file, src, tmp_path / "other", **KW)
    res = L.predict_to_zarr(model_file, src, out, overwrite=True, **{**KW, "n_samples": 2})
    assert res.info["chunks_run"] == 12 and not res.info["resumed"]


def test_ome_zarr_and_lazy_tiff_inputs(tiny_model, tmp_path):
    img = np.clip(_stack(frames=1)[0], 0, None)
    ome = tmp_path / "img.ome.zarr"
    g = zarr.open_group(str(ome), mode="w", zarr_format=2)
    g.create_array("0", shape=(1, 2, 1) + img.shape, chunks=(1, 1, 1, 40, 40), dtype="uint16")
    g["0"][0, 1, 0] = img.astype(np.uint16)
    g["0"][0, 0, 0] = 0
    g.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                               "axes": [{"name": n} for n in ("t", "c", "z", "y", "x")]}]
    with pytest.raises(InputError, match="2 channels .*--channel"):
        open_array(ome)
    src = open_array(ome, channel=1)
    assert src.axes == "TZYX" and src.array.shape == (1, 1) + img.shape
    want = predict(tiny_model, img.astype(np.uint16), n_samples=3, seed=1).mmse
    res = L.predict_dask(tiny_model, ome, channel=1, **KW)
    np.testing.assert_allclose(res.mmse.compute(scheduler="sync")[0, 0], want, rtol=1e-4, atol=1e-3)
    tif = tmp_path / "big.tif"
    tifffile.imwrite(tif, img, tile=(32, 32))
    lazy = open_array(tif)
    assert isinstance(lazy.array, da.Array) and lazy.array.shape == img.shape
    np.testing.assert_array_equal(lazy.array[5:40, 7:50].compute(), img[5:40, 7:50])


def _count_model_loads() -> None:
    """In a worker: count the model files it reads from now on (wraps the engine's loader)."""
    from napari_hdn.engine.network import loading as engine_model

    real = engine_model.load_model

    def counted(*args, **kwargs):
        counted.calls += 1
        return real(*args, **kwargs)

    counted.calls = 0
    engine_model.load_model = counted


def _model_loads() -> int:
    from napari_hdn.engine.network import loading as engine_model

    return engine_model.load_model.calls


def test_cli_zarr_in_process_and_local_cluster(model_file, tmp_path, capsys):
    img = _stack(frames=2, shape=(64, 64))
    src = tmp_path / "in.zarr"
    zarr.open_array(str(src), mode="w", shape=img.shape, chunks=(1, 64, 64), dtype="float32")[:] = img
    common = ["predict", str(model_file), str(src), "--samples", "3", "--seed", "1", "--axes", "TYX",
              "--tile-size", "32", "--tile-overlap", "32", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a.zarr")]) == 0
    assert "8 of 8 chunks computed in this process" in capsys.readouterr().out
    a = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    assert a["mmse"].shape == (2, 64, 64) and int(np.asarray(a["done"][...]).sum()) == 8
    rc = main([*common, "--out-dir", str(tmp_path / "x")])
    assert rc == 1 and "--out OUT.zarr" in capsys.readouterr().err
    # a LocalCluster of 2 worker processes: the same values; each worker loaded the model once
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.run(_count_model_loads)
        res = L.predict_to_zarr(model_file, src, tmp_path / "b.zarr", axes="TYX",
                                scheduler=cluster.scheduler_address, **KW)  # as --scheduler ADDRESS
        loads = client.run(_model_loads)
        with pytest.raises(InputError, match="save it first"):
            L.predict_to_zarr(L.ModelRef(model_file).get(), src, tmp_path / "c.zarr", axes="TYX",
                              scheduler=client, **KW)
    assert sorted(loads.values()) == [1, 1], loads
    np.testing.assert_allclose(res.mmse.compute(), np.asarray(a["mmse"][...]), atol=1e-5)


def test_zarr_output_keeps_the_input_pixel_size(tiny_model, tmp_path):
    img = np.clip(_stack(frames=2), 0, None).astype(np.float32)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, img, imagej=True, resolution=(1 / 0.3, 1 / 0.3),
                     metadata={"axes": "TYX", "unit": "um"})
    out = tmp_path / "out.zarr"
    L.predict_to_zarr(tiny_model, str(src), out, **KW)
    image = dict(zarr.open_group(str(out), mode="r").attrs)["napari_hdn"]["image"]
    assert image["axes"] == "TYX" and image["scale"]["X"] == pytest.approx(0.3)
    assert image["units"]["X"] == "µm"
