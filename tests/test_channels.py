"""Images with channels (engine/channels.py): layouts, one noise model and one HDN per channel,
the input's layout and pixel size in the results (API and command line)."""

import numpy as np
import pytest
import tifffile
import torch
from _helpers import TINY, smooth_image

import napari_hdn
from napari_hdn.cli import main
from napari_hdn.engine import GaussianNoiseModel, InputError, ModelFileError, StopFlag
from napari_hdn.engine.data.imageio import hdn_description, read_tiff_meta
from napari_hdn.engine.data.layout import layout_of
from napari_hdn.engine.network.multichannel import MultiChannelModel
from napari_hdn.engine.noise import load_noise_model
from napari_hdn.engine.noise.channels import ChannelNoiseModels

FAST = dict(TINY, patch_size=32, batch_size=8, bn_chunk=4, device="cpu", lr=3e-3, threads=1,
            val_fraction=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _two_channels(shape=(64, 64), sigma=(10.0, 20.0), seed=0):
    """(clean, noisy) CYX: two different structures, different noise levels."""
    rng = np.random.default_rng(seed)
    clean = np.stack([smooth_image(shape, seed), 50 + 2 * smooth_image(shape, seed + 7)])
    noisy = clean + rng.normal(0, 1, clean.shape) * np.asarray(sigma)[:, None, None]
    return clean, noisy.astype(np.float32)


@pytest.mark.parametrize("shape,axes,expect", [
    ((2, 64, 64), "CYX", ("CYX", "YX", 0, 2)),
    ((5, 2, 64, 64), "TCYX", ("TCYX", "TYX", 1, 2)),
    ((2, 5, 64, 64), "CZYX", ("CZYX", "ZYX", 0, 2)),
    ((3, 2, 64, 64), "SCYX", ("SCYX", "SYX", 1, 2)),
    ((64, 80, 3), None, ("YXC", "YX", 2, 3)),  # RGB, as napari takes it
    ((4, 64, 80, 3), None, ("SYXC", "SYX", 3, 3)),
    ((4, 64, 80), None, ("SYX", "SYX", None, 1)),
    ((64, 80), "yx", ("YX", "YX", None, 1)),
])
def test_layouts(shape, axes, expect):
    lay = layout_of(shape, axes)
    assert (lay.axes, lay.frame_axes, lay.channel_pos, lay.channels) == expect


@pytest.mark.parametrize("shape,axes,words", [
    ((64, 2, 64), "YCX", "goes before Y and X"),
    ((2, 2, 64, 64), "CCYX", "more than once"),
    ((2, 64, 64), "CTYX", "4 letters"),
    ((2, 3, 64, 64), "CYXT", "end with 'YX'"),
])
def test_layouts_that_do_not_fit_say_why(shape, axes, words):
    with pytest.raises(InputError, match=words):
        layout_of(shape, axes)


def test_one_hdn_per_channel_predicts_in_the_input_layout(tmp_path):
    clean, noisy = _two_channels()
    noise = [GaussianNoiseModel(10.0), GaussianNoiseModel(20.0)]
    events = []
    model = napari_hdn.train(noisy, noise, axes="CYX", callbacks=events.append,
                             checkpoint_dir=tmp_path / "ck", **{**FAST, "max_steps": 30})
    assert isinstance(model, MultiChannelModel) and model.channels == 2
    assert model.info["axes"] == "CYX" and model.info["steps"] == [30, 30]
    # each channel has its own noise model and normalisation (the channels' ranges differ)
    assert [m.noise_model.sigma for m in model.models] == [10.0, 20.0]
    assert model.models[1].normalisation.mean > model.models[0].normalisation.mean + 30
    assert {e.metrics["channel"] for e in events if e.kind == "step"} == {0, 1}
    assert (tmp_path / "ck" / "channel-1" / "final.hdn").exists()
    assert (tmp_path / "ck" / "channel-2" / "final.hdn").exists()
    res = model.predict(noisy, n_samples=4, axes="CYX", return_samples=True)
    assert res.mmse.shape == res.variance.shape == (2, 64, 64)
    assert res.samples.shape == (4, 2, 64, 64) and res.info["channels"] == 2
    # channel k of the result is channel k's model on channel k, with its own latent seed
    alone = model.channel(1).predict(noisy[1], n_samples=4, seed=res.info["channel_seeds"][1])
    np.testing.assert_allclose(res.mmse[1], alone.mmse, rtol=1e-5, atol=1e-4)
    # the same in rounds, and in another layout (channels last)
    rounds = napari_hdn.predict_in_rounds(model, np.moveaxis(noisy, 0, -1), n_samples=4,
                                          axes="YXC")
    np.testing.assert_allclose(np.moveaxis(rounds.mmse, -1, 0), res.mmse, rtol=1e-5, atol=1e-4)
    model.save(tmp_path / "two.hdn")
    again = napari_hdn.load_model(tmp_path / "two.hdn")
    assert isinstance(again, MultiChannelModel) and again.info["axes"] == "CYX"
    np.testing.assert_array_equal(again.predict(noisy, n_samples=4, axes="CYX").mmse, res.mmse)


def test_channel_counts_that_do_not_fit_are_refused_by_name():
    _, noisy = _two_channels()
    model = napari_hdn.train(noisy, GaussianNoiseModel(15.0), axes="CYX", **{**FAST, "max_steps": 2})
    with pytest.raises(InputError, match="trained on 2 channels .*has 1 channel"):
        model.predict(noisy[0], n_samples=2)
    with pytest.raises(InputError, match="trained on 2 channels .*has 3 channel"):
        model.predict(np.concatenate([noisy, noisy[:1]]), n_samples=2, axes="CYX")
    single = model.channel(0)
    with pytest.raises(InputError, match="trained on one channel, but the image has 2 channels"):
        single.predict(noisy, n_samples=2, axes="CYX")
    with pytest.raises(InputError, match="3 noise model"):
        napari_hdn.train(noisy, [GaussianNoiseModel(1.0)] * 3, axes="CYX", **FAST)
    with pytest.raises(InputError, match="per channel .* no channel axis"):
        napari_hdn.train(noisy[0], ChannelNoiseModels([GaussianNoiseModel(1.0)] * 2), **FAST)
    with pytest.raises(InputError, match="channel 5 does not exist"):
        model.channel(5)


def test_a_stop_in_an_early_channel_keeps_it_and_resumes(tmp_path):
    _, noisy = _two_channels()
    stop = StopFlag()

    def cb(ev):
        if ev.kind == "step" and ev.metrics["channel"] == 1 and ev.step == 3:
            stop.set()

    kw = {**FAST, "max_steps": 6, "steps_per_epoch": 3}
    with pytest.raises(napari_hdn.StopRequested, match="stopped during channel 2 of 3"):
        napari_hdn.train(np.concatenate([noisy, noisy[:1]]), GaussianNoiseModel(15.0), axes="CYX",
                         checkpoint_dir=tmp_path, callbacks=cb, stop_flag=stop, **kw)
    assert (tmp_path / "channel-1" / "final.hdn").exists()
    assert (tmp_path / "channel-2" / "last.hdn").exists()
    assert not (tmp_path / "channel-2" / "final.hdn").exists()
    events = []
    model = napari_hdn.train(np.concatenate([noisy, noisy[:1]]), None, axes="CYX",
                             resume=tmp_path, callbacks=events.append, **kw)
    assert model.channels == 3 and model.info["steps"] == [6, 6, 6]
    starts = [e for e in events if e.kind == "start"]
    assert [e.metrics["channel"] for e in starts] == [1, 2] and starts[0].step == 3


def test_noise_models_per_channel_in_one_file(tmp_path):
    models = ChannelNoiseModels([GaussianNoiseModel(3.0), GaussianNoiseModel(7.0)])
    models.save(tmp_path / "two.hdnoise")
    back = load_noise_model(tmp_path / "two.hdnoise")
    assert isinstance(back, ChannelNoiseModels) and [m.sigma for m in back] == [3.0, 7.0]
    assert main(["noise-model", "describe", str(tmp_path / "two.hdnoise")]) == 0
    with pytest.raises(ModelFileError, match="multi-channel model"):
        from napari_hdn.engine.network.model import read_model_file

        _, noisy = _two_channels()
        m = napari_hdn.train(noisy, GaussianNoiseModel(15.0), axes="CYX", **{**FAST, "max_steps": 1})
        m.save(tmp_path / "m.hdn")
        read_model_file(tmp_path / "m.hdn")


def test_cli_two_channel_imagej_stack_keeps_channels_and_pixel_size(tmp_path, capsys):
    from scipy import ndimage as ndi

    _, noisy = _two_channels((128, 128))
    src = tmp_path / "two.tif"
    tifffile.imwrite(src, noisy, imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "CYX", "unit": "um"})
    pseudo = tmp_path / "pseudo.tif"
    tifffile.imwrite(pseudo, ndi.gaussian_filter(noisy, (0, 2, 2)), imagej=True,
                     metadata={"axes": "CYX"})
    nm = tmp_path / "two.hdnoise"
    assert main(["noise-model", "fit", "--noisy", str(src), "--pseudo-clean", str(pseudo),
                 "--out", str(nm), "--quiet"]) == 0
    fitted = load_noise_model(nm)
    assert isinstance(fitted, ChannelNoiseModels) and len(fitted) == 2
    assert (tmp_path / "two.diagnostics.channel-2.png").exists()
    # one model per channel: the second channel is twice as noisy, and its fit says so
    sd = [float(fitted[c].moments(torch.tensor([float(np.median(noisy[c]))]))[1]) for c in range(2)]
    assert 1.6 < sd[1] / sd[0] < 2.4, sd
    # bootstrapped with Noise2Void, channel by channel
    boot = tmp_path / "boot.hdnoise"
    capsys.readouterr()
    assert main(["noise-model", "fit", "--noisy", str(src), "--out", str(boot), "--n2v-steps", "5",
                 "--quiet", "--no-figure", "--json"]) == 0
    d = __import__("json").loads(capsys.readouterr().out)
    assert d["kind"] == "per-channel" and len(d["channels"]) == 2
    assert all(ch["pairs_record"]["n2v"]["steps"] == 5 for ch in d["channels"])
    _, noisy = _two_channels()
    src = tmp_path / "two64.tif"
    tifffile.imwrite(src, noisy, imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "CYX", "unit": "um"})
    model = tmp_path / "two.hdn"
    assert main(["train", str(src), "--noise-model", str(nm), "--out", str(model), "--levels", "2",
                 "--z-dim", "2", "--filters", "8", "--blocks", "1", "--patch-size", "32",
                 "--batch-size", "8", "--max-steps", "4", "--val-fraction", "0", "--threads", "1",
                 "--init", "scratch", "--quiet"]) == 0
    assert "2 channels, axes CYX" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert main(["predict", str(model), str(src), "--out-dir", str(out), "--samples", "2",
                 "--save-samples", "--quiet"]) == 0
    for name, shape, axes in (("mmse", (2, 64, 64), "CYX"), ("variance", (2, 64, 64), "CYX"),
                              ("samples", (2, 2, 64, 64), "SCYX")):
        got_shape, _, meta = read_tiff_meta(out / f"{name}.tif")
        assert got_shape == shape and meta.axes == axes
        assert meta.scale["X"] == pytest.approx(0.25) and meta.scale["Y"] == pytest.approx(0.25)
        assert meta.units["X"] == "µm"
    assert hdn_description(out / "mmse.tif")["axes"] == "CYX"
    # a one-channel image is refused by the two-channel model, naming the channels
    tifffile.imwrite(tmp_path / "one.tif", noisy[0])
    assert main(["predict", str(model), str(tmp_path / "one.tif"), "--out-dir",
                 str(tmp_path / "x"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "trained on 2 channels" in err and not (tmp_path / "x").exists()


def test_cli_rgb_image_trains_and_predicts_as_rgb(tmp_path, capsys):
    rng = np.random.default_rng(3)
    clean = np.stack([smooth_image((64, 64), k) * 2 + 20 for k in range(3)], axis=-1)
    rgb = np.clip(clean + rng.normal(0, 8, clean.shape), 0, 255).astype(np.uint8)
    src = tmp_path / "rgb.tif"
    tifffile.imwrite(src, rgb, photometric="rgb")
    model = tmp_path / "rgb.hdn"
    assert main(["train", str(src), "--gaussian-sigma", "8", "--out", str(model), "--levels", "2",
                 "--z-dim", "2", "--filters", "8", "--blocks", "1", "--patch-size", "32",
                 "--batch-size", "8", "--max-steps", "2", "--val-fraction", "0", "--threads", "1",
                 "--init", "scratch", "--quiet"]) == 0
    assert "3 channels, axes YXC" in capsys.readouterr().out
    assert napari_hdn.load_model(model).info["channel_names"] == ["R", "G", "B"]
    out = tmp_path / "pred"
    assert main(["predict", str(model), str(src), "--out-dir", str(out), "--samples", "2",
                 "--quiet"]) == 0
    with tifffile.TiffFile(out / "mmse.tif") as tif:
        assert tif.series[0].shape == (64, 64, 3) and tif.pages[0].photometric == 2  # RGB


def test_cli_outputs_keep_the_pixel_size_of_one_channel_stacks(tmp_path):
    _, noisy = _two_channels()
    src = tmp_path / "tyx.tif"
    tifffile.imwrite(src, noisy, imagej=True, resolution=(1 / 0.13, 1 / 0.13),
                     metadata={"axes": "TYX", "unit": "micron", "finterval": 2.5})
    m = napari_hdn.train(noisy[0], GaussianNoiseModel(10.0), **{**FAST, "max_steps": 1})
    m.save(tmp_path / "m.hdn")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "m.hdn"), str(src), "--out-dir", str(out),
                 "--samples", "2", "--quiet"]) == 0
    _, _, meta = read_tiff_meta(out / "mmse.tif")
    assert meta.axes == "TYX" and meta.scale["X"] == pytest.approx(0.13)
    assert meta.scale["T"] == pytest.approx(2.5) and meta.units["T"] == "s"
    with tifffile.TiffFile(out / "mmse.tif") as tif:  # readers of the TIFF tags see it too
        num, den = tif.pages[0].tags["XResolution"].value
        assert tif.pages[0].tags["ResolutionUnit"].value == 3 and den / num * 1e4 == \
            pytest.approx(0.13)


def test_chunked_prediction_takes_one_channel_of_a_model_per_channel(tmp_path):
    pytest.importorskip("zarr")
    from napari_hdn.engine.prediction.chunked import predict_to_zarr

    _, noisy = _two_channels()
    model = napari_hdn.train(noisy, GaussianNoiseModel(15.0), axes="CYX", **{**FAST, "max_steps": 2})
    path = tmp_path / "m.hdn"
    model.save(path)
    src = tmp_path / "two.tif"
    tifffile.imwrite(src, noisy, imagej=True, metadata={"axes": "CYX"})
    kw = dict(n_samples=2, seed=3, tile_size=32, margin=32)  # the margin covers the field of view
    with pytest.raises(InputError, match="one HDN per channel .*--channel K"):
        predict_to_zarr(str(path), str(src), tmp_path / "a.zarr", **kw)
    res = predict_to_zarr(str(path), str(src), tmp_path / "b.zarr", channel=1, **kw)
    want = model.channel(1).predict(noisy[1], n_samples=2, seed=3)
    np.testing.assert_allclose(np.asarray(res.mmse), want.mmse, rtol=1e-4, atol=1e-3)
