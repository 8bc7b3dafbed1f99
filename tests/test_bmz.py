"""BioImage Model Zoo packages: export passes bioimageio.core's model test, the zip predicts the
same MMSE as the .hdn, and a package that is not a napari-hdn HDN is refused in one line."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import tifffile
import torch
from _helpers import TINY, smooth_image

from napari_hdn.cli import main
from napari_hdn.engine import (
    GaussianNoiseModel,
    HDNModel,
    ModelConfig,
    ModelFileError,
    Normalisation,
    load_model,
    predict,
)
from napari_hdn.engine.network.loading import is_bmz_package, load_bmz

pytest.importorskip("bioimageio.core", reason="BMZ export needs the bmz extra: "
                    "pip install 'napari-hdn[bmz]'")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bmz")
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**TINY), GaussianNoiseModel(10.0), Normalisation(50.0, 30.0))
    model.info["image"] = {"axes": "YX", "scale": {"Y": 0.25, "X": 0.25},
                           "units": {"Y": "µm", "X": "µm"}}
    model.save(d / "m.hdn")
    rng = np.random.default_rng(0)
    img = np.stack([smooth_image((48, 40), k) for k in range(2)])
    tifffile.imwrite(d / "noisy.tif", (img + rng.normal(0, 10, img.shape)).astype(np.float32))
    code = main(["export-bmz", str(d / "m.hdn"), "--image", str(d / "noisy.tif"), "--out",
                 str(d / "m.zip"), "--samples", "4", "--author", "A. Tester"])
    assert code == 0
    return d


def test_export_writes_a_package_that_passes_the_zoo_test(files, capsys):
    z = zipfile.ZipFile(files / "m.zip")
    names = set(z.namelist())
    assert {"rdf.yaml", "weights.pt", "test_noisy.npy", "test_mmse.npy", "test_variance.npy",
            "cover.png", "README.md", "noise_model.hdnoise", "environment.yaml"} <= names
    rdf = z.read("rdf.yaml").decode()
    assert "HDNBioimageModel" in rdf and "napari_hdn.engine.bmz" in rdf
    assert "scale: 0.25" in rdf and "micrometer" in rdf  # the pixel size of the training data
    x = np.load(z.open("test_noisy.npy"))
    assert x.shape == (1, 1, 48, 40) and x.dtype == np.float32
    # the package is written only once it passed; its test passes again from the file
    from bioimageio.core import test_model

    assert test_model(files / "m.zip", devices=["cpu"]).status == "passed"
    assert not list(files.glob(".*partial*"))


def test_the_zip_predicts_the_same_mmse_as_the_hdn(files, tmp_path):
    assert is_bmz_package(files / "m.zip") and not is_bmz_package(files / "m.hdn")
    a, b = load_model(files / "m.hdn"), load_bmz(files / "m.zip")
    x = tifffile.imread(files / "noisy.tif")
    ra, rb = predict(a, x, n_samples=4, axes="SYX", seed=5), predict(b, x, n_samples=4, axes="SYX",
                                                                      seed=5)
    assert np.array_equal(ra.mmse, rb.mmse) and np.array_equal(ra.variance, rb.variance)
    # the package's own test output is what the engine gives with the package's settings
    z = zipfile.ZipFile(files / "m.zip")
    t_in, t_out = np.load(z.open("test_noisy.npy")), np.load(z.open("test_mmse.npy"))
    assert np.allclose(predict(b, t_in[0, 0], n_samples=4, seed=0).mmse, t_out[0, 0], atol=1e-5)
    # and the command line predicts from the zip
    out = tmp_path / "out"
    assert main(["predict", str(files / "m.zip"), str(files / "noisy.tif"), "--out-dir", str(out),
                 "--samples", "4", "--seed", "5", "--axes", "SYX"]) == 0
    assert np.array_equal(tifffile.imread(out / "mmse.tif"), ra.mmse)


def _zip(path, files: dict) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


FOREIGN = """format_version: 0.5.3
type: model
name: some UNet
weights:
  pytorch_state_dict:
    source: weights.pt
    architecture: {callable: UNet, import_from: careamics.models}
"""


@pytest.mark.parametrize("content, words", [
    ({"rdf.yaml": FOREIGN, "weights.pt": "x"}, "not an HDN exported by napari-hdn"),
    ({"rdf.yaml": "type: dataset\nname: d\n"}, "not a model"),
    ({"README.md": "no description"}, "without rdf.yaml"),
    ({"rdf.yaml": ": : :\n  - ["}, "not valid YAML"),
])
def test_a_package_that_is_not_an_hdn_is_refused_in_one_line(tmp_path, capsys, content, words):
    p = tmp_path / "other.zip"
    _zip(p, content)
    with pytest.raises(ModelFileError, match=words):
        load_model(p)
    code = main(["predict", str(p), str(tmp_path / "x.tif"), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_damaged_weights_in_an_hdn_package_are_refused(files, tmp_path):
    src = zipfile.ZipFile(files / "m.zip")
    p = tmp_path / "damaged.zip"
    with zipfile.ZipFile(p, "w") as z:
        for n in src.namelist():
            z.writestr(n, b"junk" if n == "weights.pt" else src.read(n))
    with pytest.raises(ModelFileError, match="cannot be read as a state dict"):
        load_bmz(p)


def test_export_refuses_bad_requests_before_writing(files, tmp_path, capsys):
    base = ["export-bmz", str(files / "m.hdn"), "--image", str(files / "noisy.tif")]
    cases = [
        (["--out", str(files / "m.zip")], "--overwrite"),  # exists
        (["--out", str(tmp_path / "m.tar")], ".zip"),
        (["--out", str(tmp_path / "l.zip"), "--license", "not-a-licence"], "SPDX"),
        (["--out", str(tmp_path / "s.zip"), "--samples", "0"], "--samples"),
    ]
    for extra, words in cases:
        assert main(base + extra) == 1, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "l.zip").exists() and not (tmp_path / "s.zip").exists()


@pytest.mark.usefixtures("widget_session")
def test_the_predict_widgets_export_button_writes_a_tested_package(viewer, qtbot, notes, files,
                                                                   tmp_path, monkeypatch):
    from _widget_helpers import WAIT, dock

    from napari_hdn.session import get_session
    from napari_hdn.widgets import _forms

    get_session().add_model(load_model(files / "m.hdn"), "tiny", path=files / "m.hdn")
    stack = tifffile.imread(files / "noisy.tif")
    viewer.add_image(stack, name="noisy")
    pw = dock(viewer, "Predict and explore")
    assert pw.export_btn.isEnabled()
    out = tmp_path / "shared"
    monkeypatch.setattr(_forms.QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    assert pw.export_bmz()
    task = pw.side_tasks["Export"].task
    qtbot.waitUntil(lambda: not task.running, timeout=WAIT)
    zip_path = out.with_suffix(".zip")
    assert zip_path.is_file() and is_bmz_package(zip_path)
    assert any("Exported shared.zip: bioimageio.core's test passed" in m for m in notes.infos), \
        notes.infos
    # the package predicts what the model file does (its test input is the first frame's crop)
    frame = stack[0]
    a = predict(load_bmz(zip_path), frame, n_samples=4, seed=0).mmse
    b = predict(load_model(files / "m.hdn"), frame, n_samples=4, seed=0).mmse
    np.testing.assert_array_equal(a, b)
    # and the widget's Load… takes the package back
    assert pw.load_model(zip_path) is not None
    assert any(e.path == zip_path for e in get_session().models.values())
