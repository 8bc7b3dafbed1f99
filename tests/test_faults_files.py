"""Fault injection, part two: files and arrays as they really come.

Inputs that are no file to read (a FIFO, a device, a socket, a folder, a symbolic link loop, a
broken link, an empty file), TIFFs whose layout is easy to misread (planar RGB, several series, no
pages), NumPy masked arrays, lists of images of different shapes, torch tensors and saturated data.
Each probe says what must come out: an exit code and words of the one-line message, an exception
type, a warning or a shape. As in test_faults, inputs must not change and no traceback may be
printed. A FIFO probe that regressed would block for ever in ``open``: a watchdog opens the FIFO's
other end after a while, so that the probe fails instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import warnings

import numpy as np
import pytest
import tifffile
import torch
from _helpers import TINY, smooth_image
from test_faults import TINY_FIT, _hashes, _model, _no_nan_outputs

import napari_hdn
from napari_hdn.cli import main
from napari_hdn.engine import GaussianNoiseModel, HDNError, InputError, ModelFileError
from napari_hdn.engine.data.frames import SaturationWarning, check_saturation
from napari_hdn.engine.data.imageio import read_tiff, read_tiff_meta

TRAIN_TINY = ["--levels", "2", "--z-dim", "2", "--filters", "8", "--blocks", "1", "--patch-size",
              "32", "--batch-size", "2", "--device", "cpu", "--quiet", "--max-steps", "1"]
API_TRAIN = dict(**TINY, patch_size=32, batch_size=2, max_steps=1, val_fraction=0.0, device="cpu")
FIFOS = ("fifo.hdn", "fifo.hdnoise", "fifo.tif")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    img = np.stack([smooth_image((64, 64), k) for k in range(2)])
    tifffile.imwrite(d / "noisy.tif", (img + rng.normal(0, 10, img.shape)).astype(np.float32))
    _model().save(d / "m.hdn")
    GaussianNoiseModel(10.0).save(d / "g.hdnoise")
    for name in FIFOS:
        os.mkfifo(d / name)
    for a, b in (("loop.hdn", "loop2.hdn"), ("loop2.hdn", "loop.hdn"), ("loop.tif", "loop2.tif"),
                 ("loop2.tif", "loop.tif"), ("loop.hdnoise", "loop.hdnoise")):
        os.symlink(d / b, d / a)
    os.symlink(d / "gone.tif", d / "broken.tif")
    os.symlink(d / "gone.hdn", d / "broken.hdn")
    (d / "empty.tif").write_bytes(b"")
    (d / "nopages.tif").write_bytes(b"II*\x00\x00\x00\x00\x00")  # a header, no image file directory
    (d / "notags.tif").write_bytes(b"II*\x00\x08\x00\x00\x00" + b"\x00" * 6)  # an IFD of no tags
    (d / "folder.hdn").mkdir()
    (d / "folder.tif").mkdir()
    rgb = rng.integers(20, 200, (3, 64, 64)).astype(np.uint8)
    tifffile.imwrite(d / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(d / "planar_stack.tif", np.stack([rgb, rgb]), photometric="rgb",
                     planarconfig="separate")
    tifffile.imwrite(d / "ij_rgb.tif", np.moveaxis(np.stack([rgb, rgb]), 1, -1), photometric="rgb",
                     imagej=True, metadata={"axes": "TYXS"})
    for name, second in (("series.tif", (80, 80)), ("series_same.tif", (64, 64))):
        with tifffile.TiffWriter(d / name) as w:
            w.write(rng.normal(50, 10, (64, 64)).astype(np.float32))
            w.write(rng.normal(50, 10, second).astype(np.float32))
    sat = np.clip(rng.normal(200, 40, (64, 64)), 0, 255).astype(np.uint8)  # ~9 % at 255
    tifffile.imwrite(d / "saturated.tif", sat)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(d / "socket.tif"))
    yield d
    sock.close()


@contextlib.contextmanager
def _watchdog(folder, seconds=15.0):
    """Open the write end of the folder's FIFOs after ``seconds``: a reader blocked in ``open``
    then reads an empty file, and the probe fails instead of hanging."""
    def unblock():
        for name in FIFOS:
            try:
                os.close(os.open(folder / name, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # nobody reading: nothing to unblock
                pass

    timer = threading.Timer(seconds, unblock)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _fill(argv, inp, out):
    return [a.replace("{in}", str(inp)).replace("{out}", str(out)) for a in argv]


# -- the command line -------------------------------------------------------------------------------
# (id, argv with {in} = inputs folder and {out} = a fresh output folder, message words)
CLI_ROWS = [
    # no file to read: refused from os.stat, a FIFO never opened
    ("predict-model-fifo", ["predict", "{in}/fifo.hdn", "{in}/noisy.tif", "--out-dir", "{out}"],
     "is a FIFO (named pipe), not a file: give a regular file"),
    ("predict-input-fifo", ["predict", "{in}/m.hdn", "{in}/fifo.tif", "--out-dir", "{out}"],
     "input {in}/fifo.tif is a FIFO"),
    ("train-input-fifo", ["train", "{in}/fifo.tif", "--gaussian-sigma", "10", "--out",
                          "{out}/m.hdn"], "is a FIFO"),
    ("train-noise-model-fifo", ["train", "{in}/noisy.tif", "--noise-model", "{in}/fifo.hdnoise",
                                "--out", "{out}/m.hdn"], "noise model {in}/fifo.hdnoise is a FIFO"),
    ("train-resume-fifo", ["train", "{in}/noisy.tif", "--resume", "{in}/fifo.hdn", "--out",
                           "{out}/m.hdn"], "checkpoint (--resume) {in}/fifo.hdn is a FIFO"),
    ("describe-fifo", ["noise-model", "describe", "{in}/fifo.hdnoise"], "is a FIFO"),
    ("fit-calibration-fifo", ["noise-model", "fit", "--calibration", "{in}/fifo.tif", "--out",
                              "{out}/c.hdnoise", *TINY_FIT], "calibration frames {in}/fifo.tif is a FIFO"),
    ("fit-noisy-fifo", ["noise-model", "fit", "--noisy", "{in}/fifo.tif", "--out",
                        "{out}/c.hdnoise", *TINY_FIT], "is a FIFO"),
    ("levels-input-fifo", ["levels", "{in}/m.hdn", "{in}/fifo.tif"], "is a FIFO"),
    ("chunked-input-fifo", ["predict", "{in}/m.hdn", "{in}/fifo.tif", "--out", "{out}/p.zarr"],
     "is a FIFO"),
    ("predict-model-dev-zero", ["predict", "/dev/zero", "{in}/noisy.tif", "--out-dir", "{out}"],
     "/dev/zero is a character device, not a file"),
    ("predict-input-dev-null", ["predict", "{in}/m.hdn", "/dev/null", "--out-dir", "{out}"],
     "/dev/null is a character device"),
    ("predict-input-socket", ["predict", "{in}/m.hdn", "{in}/socket.tif", "--out-dir", "{out}"],
     "is a socket, not a file"),
    ("predict-model-folder", ["predict", "{in}/folder.hdn", "{in}/noisy.tif", "--out-dir", "{out}"],
     "is a folder"),
    ("predict-input-folder-slash", ["predict", "{in}/m.hdn", "{in}/folder.tif/", "--out-dir",
                                    "{out}"], "is a folder, not a TIFF file"),
    ("predict-input-under-a-file", ["predict", "{in}/m.hdn", "{in}/noisy.tif/x.tif", "--out-dir",
                                    "{out}"], "{in}/noisy.tif is a file, not a folder"),
    # symbolic links: loops and broken links, one line naming the path
    ("predict-model-loop", ["predict", "{in}/loop.hdn", "{in}/noisy.tif", "--out-dir", "{out}"],
     "{in}/loop.hdn is a symbolic link loop"),
    ("predict-input-loop", ["predict", "{in}/m.hdn", "{in}/loop.tif", "--out-dir", "{out}"],
     "input {in}/loop.tif is a symbolic link loop"),
    ("train-input-loop", ["train", "{in}/loop.tif", "--gaussian-sigma", "10", "--out",
                          "{out}/m.hdn"], "symbolic link loop"),
    ("train-noise-model-loop", ["train", "{in}/noisy.tif", "--noise-model", "{in}/loop.hdnoise",
                                "--out", "{out}/m.hdn"], "symbolic link loop"),
    ("train-resume-loop", ["train", "{in}/noisy.tif", "--resume", "{in}/loop.hdn", "--out",
                           "{out}/m.hdn"], "symbolic link loop"),
    ("describe-loop", ["noise-model", "describe", "{in}/loop.hdnoise"], "symbolic link loop"),
    ("predict-input-broken-link", ["predict", "{in}/m.hdn", "{in}/broken.tif", "--out-dir",
                                   "{out}"], "broken symbolic link: it points to {in}/gone.tif"),
    ("predict-model-broken-link", ["predict", "{in}/broken.hdn", "{in}/noisy.tif", "--out-dir",
                                   "{out}"], "broken symbolic link"),
    # TIFFs without an image
    ("predict-input-empty", ["predict", "{in}/m.hdn", "{in}/empty.tif", "--out-dir", "{out}"],
     "is empty (0 bytes)"),
    ("predict-input-no-pages", ["predict", "{in}/m.hdn", "{in}/nopages.tif", "--out-dir", "{out}"],
     "holds no image"),
    ("train-input-no-tags", ["train", "{in}/notags.tif", "--gaussian-sigma", "10", "--out",
                             "{out}/m.hdn"], "holds no image"),
    # several series: refused, naming them
    ("predict-two-series", ["predict", "{in}/m.hdn", "{in}/series.tif", "--out-dir", "{out}"],
     "holds 2 image series (64x64, 80x80)"),
    ("train-two-series-same-shape", ["train", "{in}/series_same.tif", "--gaussian-sigma", "10",
                                     "--out", "{out}/m.hdn"], "save them as one stack"),
    ("fit-two-series", ["noise-model", "fit", "--calibration", "{in}/series.tif", "--out",
                        "{out}/c.hdnoise", *TINY_FIT], "a TIFF of its own"),
    ("chunked-two-series", ["predict", "{in}/m.hdn", "{in}/series.tif", "--out", "{out}/p.zarr"],
     "2 image series"),
    # planar RGB is one colour image (channels), not three frames
    ("predict-planar-rgb", ["predict", "{in}/m.hdn", "{in}/planar.tif", "--out-dir", "{out}"],
     "has 3 channels (axes CYX)"),
    ("chunked-planar-rgb", ["predict", "{in}/m.hdn", "{in}/planar.tif", "--out", "{out}/p.zarr"],
     "has 3 channels (axes CYX)"),
]


@pytest.mark.parametrize("argv,words", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_probe(inputs, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    before = _hashes(inputs)
    with _watchdog(inputs):
        rc = main(_fill(argv, inputs, out))
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("napari-hdn: error:")]
    assert len(errors) == 1 and _fill([words], inputs, out)[0] in errors[0], err
    assert _hashes(inputs) == before, "an input changed"
    assert not out.exists() or not any(out.rglob("*.tif")), "an output was written"


def test_a_trailing_slash_after_a_file_names_that_file(inputs, tmp_path, capsys):
    rc = main(["predict", str(inputs / "m.hdn"), f"{inputs / 'noisy.tif'}/", "--out-dir",
               str(tmp_path), "--samples", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert tifffile.imread(tmp_path / "mmse.tif").shape == (2, 64, 64)


def test_planar_rgb_trains_one_hdn_per_colour(inputs, tmp_path, capsys):
    rc = main(["train", str(inputs / "planar.tif"), "--gaussian-sigma", "10", "--out",
               str(tmp_path / "m.hdn"), *TRAIN_TINY])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "3 channels, axes CYX" in cap.out
    assert napari_hdn.load_model(tmp_path / "m.hdn").channels == 3


def test_tiff_layouts_are_read_with_their_axes(inputs):
    for name, shape, axes in (("planar.tif", (3, 64, 64), "CYX"),
                              ("planar_stack.tif", (2, 3, 64, 64), "SCYX"),
                              ("ij_rgb.tif", (2, 64, 64, 3), "TYXC")):
        got, _, meta = read_tiff_meta(inputs / name)
        assert (got, meta.axes, meta.rgb) == (shape, axes, True), name
    # one series of several, on request (Python)
    arr, _ = read_tiff(inputs / "series.tif", series=1)
    assert arr.shape == (80, 80)
    with pytest.raises(InputError, match="has no series 2"):
        read_tiff(inputs / "series.tif", series=2)


def test_saturated_tiff_is_warned_about_on_one_line(inputs, tmp_path, capsys):
    rc = main(["predict", str(inputs / "m.hdn"), str(inputs / "saturated.tif"), "--out-dir",
               str(tmp_path / "p"), "--samples", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    share = f"{(tifffile.imread(inputs / 'saturated.tif') == 255).mean():.1%}"
    line = [ln for ln in err.splitlines() if "saturated" in ln]
    assert len(line) == 1 and line[0].startswith(f"napari-hdn: warning: the image: {share} of the "
                                                 "pixels are at 255, the largest value of the dtype "
                                                 "uint8"), err
    assert "noise model" in line[0]
    rc = main(["train", str(inputs / "saturated.tif"), "--gaussian-sigma", "10", "--out",
               str(tmp_path / "m.hdn"), *TRAIN_TINY])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sum(f"napari-hdn: warning: the training images: {share}" in ln
               for ln in err.splitlines()) == 1, err
    _no_nan_outputs(tmp_path)


# -- the Python API ------------------------------------------------------------------------------
def _img(shape=(64, 64), seed=1):
    return smooth_image(shape, seed) + np.random.default_rng(seed).normal(0, 10, shape)


def _masked(n_masked=100):
    a = np.ma.masked_array(_img(), mask=np.zeros((64, 64), bool))
    a.mask.flat[:n_masked] = True
    a.data.flat[:n_masked] = 1e6  # what would be read as data
    return a


def _calibration_masked():
    from napari_hdn.engine.noise import fit_from_calibration

    stack = np.random.default_rng(0).normal(100, 10, (8, 32, 32))
    mask = np.zeros(stack.shape, bool)
    mask[:, :4] = True
    return fit_from_calibration(np.ma.masked_array(stack, mask), kind="histogram")


API_ROWS = [
    ("predict-masked", lambda: napari_hdn.predict(_model(), _masked(), 1), InputError,
     "masked array with 100 masked pixel"),
    ("train-masked", lambda: napari_hdn.train(_masked(), GaussianNoiseModel(10), **API_TRAIN),
     InputError, "crop the image to its unmasked part"),
    ("train-masked-channels", lambda: napari_hdn.train(
        np.ma.masked_array(np.stack([_img(), _img()]), mask=True), GaussianNoiseModel(10),
        axes="CYX", **API_TRAIN), InputError, "masked array"),
    ("to-frames-masked", lambda: napari_hdn.to_frames(_masked(1)), InputError, "1 masked pixel"),
    ("fit-calibration-masked", _calibration_masked, InputError, "calibration frames is a masked"),
    ("levels-masked", lambda: napari_hdn.describe_levels(_model(), _masked()), InputError,
     "masked array"),
    ("predict-list-of-shapes", lambda: napari_hdn.predict(_model(), [_img(), _img((80, 80))], 1),
     InputError, r"different shapes \(\(64, 64\), \(80, 80\)\)"),
    ("rounds-list-of-shapes", lambda: napari_hdn.predict_in_rounds(
        _model(), [_img(), _img((80, 80))], 1), InputError, "one call each"),
    ("sampler-list-of-shapes", lambda: napari_hdn.PosteriorSampler(
        _model(), [_img(), _img((80, 80))]), InputError, "different shapes"),
    ("predict-ragged-numbers", lambda: napari_hdn.predict(_model(), [[1, 2], [3]], 1),
     InputError, "different shapes"),
    ("predict-empty-list", lambda: napari_hdn.predict(_model(), [], 1), InputError,
     "list of images is empty"),
    ("predict-meta-tensor", lambda: napari_hdn.predict(_model(), torch.empty(64, 64, device="meta"),
                                                        1), InputError, "torch tensor on meta"),
    ("predict-path", lambda: napari_hdn.predict(_model(), "noisy.tif", 1), InputError,
     r"is a path \('noisy.tif'\), not an array"),
    ("predict-none", lambda: napari_hdn.predict(_model(), None, 1), InputError, "image is None"),
    ("to-frames-none", lambda: napari_hdn.to_frames(None), InputError, "image is None"),
    ("load-fifo", lambda d: napari_hdn.load_model(d / "fifo.hdn"), ModelFileError, "is a FIFO"),
    ("load-loop", lambda d: napari_hdn.load_model(d / "loop.hdn"), ModelFileError, "symbolic link loop"),
    ("load-noise-fifo", lambda d: napari_hdn.load_noise_model(d / "fifo.hdnoise"), ModelFileError,
     "is a FIFO"),
    ("read-file-not-a-path", lambda: __import__("napari_hdn.engine.files.safeio", fromlist=["x"]).read_file(
        3, "napari-hdn-model", "napari-hdn model"), ModelFileError, "expected the path"),
    ("read-tiff-fifo", lambda d: read_tiff(d / "fifo.tif"), InputError, "is a FIFO"),
    ("read-tiff-loop", lambda d: read_tiff(d / "loop.tif"), InputError, "symbolic link loop"),
    ("tiff-pages-fifo", lambda d: __import__("napari_hdn.engine.data.frames", fromlist=["x"]).TiffPages(
        d / "fifo.tif"), InputError, "is a FIFO"),
    ("predict-zarr-from-fifo", lambda d: __import__(
        "napari_hdn.engine.prediction.chunked", fromlist=["x"]).predict_to_zarr(
        _model(), str(d / "fifo.tif"), str(d / "never.zarr"), n_samples=1), InputError,
     "is a FIFO"),
]


@pytest.mark.parametrize("call,exc_type,words", [r[1:] for r in API_ROWS],
                         ids=[r[0] for r in API_ROWS])
def test_api_probe(inputs, call, exc_type, words):
    before = _hashes(inputs)
    with pytest.raises(exc_type, match=words) as info, _watchdog(inputs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(inputs) if call.__code__.co_argcount else call()
    assert isinstance(info.value, HDNError)
    assert _hashes(inputs) == before
    assert not (inputs / "never.zarr").exists()


def test_arrays_that_stand_for_an_image_are_used_as_their_values():
    model = _model()
    img = _img()
    ref = napari_hdn.predict(model, img, 2).mmse
    # a tensor that requires grad, or a masked array without masked pixels: its values
    grad = torch.tensor(img, requires_grad=True)
    np.testing.assert_allclose(napari_hdn.predict(model, grad, 2).mmse, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(napari_hdn.predict(model, np.ma.masked_array(img), 2).mmse, ref,
                               rtol=1e-5, atol=1e-4)
    assert napari_hdn.to_frames(grad)[0].shape == (64, 64)
    # a list of images of one shape is a stack of frames
    assert napari_hdn.predict(model, [img, torch.tensor(img)], 1).mmse.shape == (2, 64, 64)
    # training: tensors (also per channel), and frames of different sizes are legitimate
    assert isinstance(napari_hdn.train(grad, GaussianNoiseModel(10), **API_TRAIN),
                      napari_hdn.HDNModel)
    two = torch.tensor(np.stack([img, img]), requires_grad=True)
    assert napari_hdn.train(two, GaussianNoiseModel(10), axes="CYX", **API_TRAIN).channels == 2
    m = napari_hdn.train([img, _img((80, 80))], GaussianNoiseModel(10), **API_TRAIN)
    assert m.info["steps"] == 1


def test_one_pixel_wide_images():
    thin = np.random.default_rng(0).normal(50, 10, (64, 1))
    assert napari_hdn.predict(_model(), thin, 1).mmse.shape == (64, 1)
    with pytest.raises(InputError, match="smaller than the patch size 32"):
        napari_hdn.train(thin, GaussianNoiseModel(10), **API_TRAIN)


@pytest.mark.filterwarnings("ignore:the image \\(mean")  # the untrained model's training range
def test_saturation_warning_sees_clipping_and_leaves_natural_data_alone():
    rng = np.random.default_rng(0)
    clipped_u16 = np.clip(rng.normal(3900, 150, (64, 64)), 0, 4095).astype(np.uint16)  # 12-bit
    with pytest.warns(SaturationWarning, match=r"at 4095, the largest value \(a spike"):
        napari_hdn.predict(_model(), clipped_u16, 1)
    with pytest.warns(SaturationWarning, match="largest value of the dtype uint16"):
        check_saturation(np.clip(rng.normal(65000, 900, (64, 64)), 0, 65535).astype(np.uint16))
    with pytest.warns(SaturationWarning, match="the training images"):
        napari_hdn.train(np.clip(_img() * 3, 0, 150), GaussianNoiseModel(10), **API_TRAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SaturationWarning)
        for natural in (rng.poisson(0.3, (64, 64)).astype(np.uint8),  # photon counts: zeros peak
                        rng.poisson(2.0, (256, 256)).astype(np.uint16),
                        rng.normal(120, 20, (64, 64)).astype(np.uint8),
                        _img().astype(np.float32)):
            assert check_saturation(natural) == ""
        napari_hdn.predict(_model(), _img(), 1)


# -- the napari reader -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,words", [("fifo.hdn", "is a FIFO"), ("fifo.hdnoise", "is a FIFO"),
                                        ("loop.hdn", "symbolic link loop"),
                                        ("loop.hdnoise", "symbolic link loop"),
                                        ("broken.hdn", "broken symbolic link"),
                                        ("folder.hdn", "is a folder")])
def test_reader_probe(inputs, monkeypatch, name, words):
    from napari.utils import notifications

    from napari_hdn import _reader

    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda m: shown.append(("error", m)))
    monkeypatch.setattr(notifications, "show_info", lambda m: shown.append(("info", m)))
    before = _hashes(inputs)
    reader = _reader.get_reader(str(inputs / name))
    assert reader is not None
    with _watchdog(inputs):
        assert reader(str(inputs / name)) == [(None,)]
    assert [k for k, _ in shown] == ["error"], shown
    assert "Could not open" in shown[0][1] and words in shown[0][1]
    assert _hashes(inputs) == before
