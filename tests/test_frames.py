"""Frames read on demand (engine/frames.py): training reads patches, never the whole image."""

import numpy as np
import pytest
import tifffile
import torch
from _helpers import TINY, smooth_image

import napari_hdn
from napari_hdn.engine import GaussianNoiseModel, InputError
from napari_hdn.engine.data.arrays import Normalisation, PatchSampler, grid_patches, training_frames
from napari_hdn.engine.data.frames import Frame, TiffPages, frame_statistics, frames_of

FAST = dict(TINY, patch_size=32, batch_size=8, bn_chunk=4, device="cpu", lr=3e-3, threads=1)


def _stack(n=3, shape=(64, 80), seed=0):
    rng = np.random.default_rng(seed)
    clean = np.stack([smooth_image(shape, k) for k in range(n)]) * 40 + 500
    return np.clip(clean + rng.normal(0, 30, clean.shape), 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("kw", [{}, {"compression": "zlib"}, {"imagej": True},
                                {"tile": (32, 32)}])
def test_tiff_pages_read_what_tifffile_reads(tmp_path, kw):
    data = _stack(4)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack", **kw)
    pages = TiffPages(tmp_path / "s.tif")
    assert pages.shape == data.shape and pages.dtype == data.dtype
    assert pages.contiguous == (not kw or "imagej" in kw)
    np.testing.assert_array_equal(pages[2, 5:37, 10:70], data[2, 5:37, 10:70])
    np.testing.assert_array_equal(pages[3, :, :], data[3])
    pages.close()


def test_tiff_pages_read_one_channel_of_interleaved_rgb(tmp_path):
    rgb = np.stack([_stack(1)[0] // 300 + k for k in range(3)], -1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    pages = TiffPages(tmp_path / "rgb.tif")
    frames = frames_of(pages, "YX", channel=(2, 1))
    np.testing.assert_array_equal(frames[0][4:20, 3:40], rgb[4:20, 3:40, 1].astype(np.float32))


def test_frames_are_views_read_on_demand():
    data = _stack(3)
    frames = training_frames(data, "TYX")
    assert len(frames) == 3 and all(isinstance(f, Frame) for f in frames)
    band = frames[1][10:40]  # a band of rows is another Frame, nothing read
    assert isinstance(band, Frame) and band.shape == (30, 80)
    np.testing.assert_array_equal(band[2:5, 7:9], data[1, 12:15, 7:9].astype(np.float32))
    mean, std = frame_statistics(frames)
    assert mean == pytest.approx(data.astype(np.float64).mean())
    assert std == pytest.approx(data.astype(np.float64).std(), rel=1e-9)
    norm = Normalisation(mean, std)
    # the sampler reads patches through the normalisation: the same patches as from arrays
    a = PatchSampler(frames, 16, torch.Generator().manual_seed(0), transform=norm.forward)
    b = PatchSampler([data[k].astype(np.float32) for k in range(3)], 16,
                     torch.Generator().manual_seed(0), transform=norm.forward)
    assert torch.equal(a.sample(5), b.sample(5))
    v = grid_patches(frames, 32, 3, transform=norm.forward)
    assert v.shape == (3, 1, 32, 32)


def test_values_are_checked_frame_by_frame():
    bad = _stack(2).astype(np.float32)
    bad[1, 3, 4] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        frame_statistics(training_frames(bad, "TYX"))
    with pytest.raises(InputError, match="rescale"):
        frame_statistics(training_frames(np.full((2, 32, 32), 1e300), "TYX"))


def test_training_from_a_large_tiff_reads_it_on_demand(tmp_path, monkeypatch):
    """A file above the lazy threshold is trained on through TiffPages: nothing loads it whole."""
    from napari_hdn.engine.data import imageio

    data = _stack(6)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TYX"})
    monkeypatch.setattr(imageio, "LAZY_BYTES", 1000)
    lazy, meta = imageio.read_tiff(path, lazy=True)
    assert isinstance(lazy, TiffPages) and meta.axes == "TYX"
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("page decoded"))
    model = napari_hdn.train(lazy, GaussianNoiseModel(30.0), axes="TYX", seed=0,
                             **{**FAST, "max_steps": 3})
    eager = napari_hdn.train(data, GaussianNoiseModel(30.0), axes="TYX", seed=0,
                             **{**FAST, "max_steps": 3})
    assert model.normalisation.mean == pytest.approx(eager.normalisation.mean)
    for (k, a), b in zip(model.ladder.state_dict().items(), eager.ladder.state_dict().values()):
        assert torch.equal(a, b), k  # the same patches, the same training


def test_tiff_pages_take_any_box_so_dask_can_wrap_them(tmp_path):
    da = pytest.importorskip("dask.array")
    data = (np.arange(5 * 3 * 16 * 20) % 997).reshape(5, 3, 16, 20).astype(np.uint16)
    tifffile.imwrite(tmp_path / "tz.tif", data, imagej=True, metadata={"axes": "TZYX"})
    pages = TiffPages(tmp_path / "tz.tif")
    for key in [(slice(0, 2),), (slice(1, 4), 2), (3, slice(0, 3), slice(2, 9)),
                (slice(None), slice(None), slice(4, 8), slice(1, 5)), (2, 1), (slice(5, 5),)]:
        np.testing.assert_array_equal(pages[key], data[key])
    lazy = da.from_array(pages, chunks=(1, 1, 16, 20))  # a lazy napari layer of a large TIFF
    np.testing.assert_array_equal(lazy.compute(), data)
