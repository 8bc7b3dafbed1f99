"""Widget tests: the noise-model widget's sources, saving/loading, and the .hdn/.hdnoise reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _widget_helpers import PLUGIN, WAIT, dock, tiny_model

from napari_hdn.widgets import get_session
from napari_hdn.widgets._base import TaskState

pytestmark = pytest.mark.usefixtures("widget_session")


def test_fit_from_calibration_stack_sample_and_save_load(viewer, qtbot, notes, tmp_path):
    """Also items 3 and 9 of issue 12: our own calibration sample gets the verdict 'good' (GMM
    and histogram alike), the widget says why, and the two models have telling names."""
    viewer.open_sample(PLUGIN, "calibration-stack")
    nw = dock(viewer, "Noise model")
    assert nw.calib_layer.currentText() == "calibration stack"  # 3D stacks preferred
    nw.set_source("calibration")
    assert nw.fit_box.isVisible() or not nw.isVisible()
    assert nw.fit()
    assert nw.state == TaskState.RUNNING and not nw.fit_btn.isEnabled()
    qtbot.waitUntil(lambda: not nw.task.running, timeout=WAIT)
    assert nw.state == TaskState.DONE, notes.errors
    nm = nw.last_entry.model
    info = nm.info
    assert info["source"] == "calibration" and info["n_pairs"] == 50 * 128 * 128
    # the sample's camera: gain 1, read noise 2, offset 100 -> std sqrt(s - 100 + 4)
    _, sd = nm.moments(torch.tensor([150.0]))
    assert abs(float(sd) - np.sqrt(54.0)) / np.sqrt(54.0) < 0.1
    assert "held-out NLL" in nw.verdict.text()
    assert info["verdict"] == "good", info["reasons"]
    assert "Good because" in nw.verdict.text() and "matches the data's" in nw.verdict.text()
    gmm_name = nw.last_entry.name
    assert gmm_name == "GMM k=3 d=1 · calibration stack"
    # the histogram model on the same sample: good too, and told apart by its name
    nw.kind.setCurrentIndex(nw.kind.findData("histogram"))
    assert nw.fit()
    qtbot.waitUntil(lambda: not nw.task.running, timeout=WAIT)
    hist = nw.last_entry
    assert hist.name == "histogram · calibration stack" and hist.model.info["verdict"] == "good"
    assert abs(hist.model.info["heldout_nll"] - info["heldout_nll"]) < 0.01
    # the full text is the tooltip of each entry in the lists (names may be cut off there)
    box = nw.model_combo
    from qtpy.QtCore import Qt

    tips = {box.itemText(i): box.itemData(i, Qt.ItemDataRole.ToolTipRole) for i in range(box.count())}
    assert "3 Gaussians, polynomial degree 1" in tips[gmm_name]
    assert "'calibration stack' (50 frames)" in tips[gmm_name] and "verdict good" in tips[gmm_name]
    assert tips["histogram · calibration stack"].startswith("histogram noise model")
    box.setCurrentText(gmm_name)
    # the large figure docks below the canvas; asking again replaces it
    assert nw.show_large_figure() is not None
    assert nw.show_large_figure() is not None
    docks = [k for k in viewer.window.dock_widgets if "Noise model diagnostics" in k]
    assert len(docks) == 1

    path = nw.save_noise_model(tmp_path / "camera")
    assert path == tmp_path / "camera.hdnoise" and path.exists()
    tw = dock(viewer, "Training")
    entry = tw.load_noise_model(path)
    assert entry.name == "camera" and tw.noise_combo.currentText() == "camera"
    assert entry.model.kind == "gmm"
    assert notes.errors == []


def test_known_models_and_pseudo_clean_bootstrap(viewer, qtbot, notes):
    viewer.open_sample(PLUGIN, "noisy-fluorescence")
    nw = dock(viewer, "Noise model")
    nw.set_source("gaussian")
    assert nw.fit_btn.text() == "Use"
    nw.sigma.setValue(7.5)
    assert nw.fit()
    assert list(get_session().noise_models) == ["Gaussian σ=7.5"]
    assert get_session().noise_models["Gaussian σ=7.5"].model.sigma == 7.5
    nw.set_source("poisson")
    nw.gain.setValue(2.0)
    assert nw.fit()
    pg = get_session().noise_models["Poisson-Gaussian g=2 r=2 o=100"].model
    assert (pg.gain, pg.read_noise, pg.offset) == (2.0, 2.0, 100.0)
    assert "known parameters" in nw.verdict.text()

    # bootstrap from a pseudo-clean layer (here: a smoothed copy of the noisy image)
    from scipy import ndimage as ndi

    noisy = viewer.layers["noisy fluorescence"].data
    viewer.add_image(ndi.gaussian_filter(noisy, 1.5), name="smoothed")
    nw.set_source("pseudo")
    nw.pseudo_noisy_layer.set_layer("noisy fluorescence")
    nw.pseudo_layer.set_layer("smoothed")
    nw.kind.setCurrentIndex(nw.kind.findData("histogram"))
    assert nw.fit()
    qtbot.waitUntil(lambda: not nw.task.running, timeout=WAIT)
    assert nw.state == TaskState.DONE, notes.errors
    e = nw.last_entry
    assert e.model.kind == "histogram" and e.model.info["source"] == "pseudo-clean"
    assert e.name == "histogram · noisy fluorescence with pseudo-clean smoothed"

    # the same layer twice is refused with a message
    nw.pseudo_layer.set_layer("noisy fluorescence")
    notes.clear()
    assert not nw.fit()
    assert "two different layers" in notes.errors[0]


def test_n2v_bootstrap_runs_and_stops(viewer, qtbot, notes):
    rng = np.random.default_rng(0)
    clean = np.kron(rng.uniform(20, 200, (8, 8)), np.ones((8, 8)))
    viewer.add_image((clean + rng.normal(0, 5, clean.shape)).astype(np.float32), name="noisy")
    nw = dock(viewer, "Noise model")
    nw.set_source("n2v")
    nw.n2v_layer.set_layer("noisy")
    nw.n2v_steps.setValue(10)
    nw.kind.setCurrentIndex(nw.kind.findData("histogram"))
    assert nw.fit()
    qtbot.waitUntil(lambda: not nw.task.running, timeout=WAIT)
    assert nw.state == TaskState.DONE, notes.errors
    info = nw.last_entry.model.info
    assert info["source"] == "n2v" and info["verdict"] == "suspicious"
    assert any("cut short by its step limit (10)" in r for r in info["reasons"])
    assert "cut short" in nw.verdict.text()

    # Stop during Noise2Void ends Noise2Void only: the pseudo-clean image is predicted and fitted
    nw.n2v_steps.setValue(0)  # auto: until its validation loss levels off
    nw.n2v_budget.setValue(0)
    nw.kind.setCurrentIndex(nw.kind.findData("gmm"))
    assert nw.fit()
    qtbot.waitUntil(lambda: "Noise2Void (pseudo" in nw.status.text(), timeout=WAIT)
    nw.stop_btn.click()
    qtbot.waitUntil(lambda: not nw.task.running, timeout=WAIT)
    assert nw.state == TaskState.DONE, nw.status.text()
    info = nw.last_entry.model.info
    assert info["pairs_record"]["n2v"]["stop_reason"] == "stopped"
    assert any("cut short by a stop request" in r for r in info["reasons"])
    assert info["fit"]["iterations"] >= 1 and not info["fit"]["stopped"]
    assert nw.fit_btn.isEnabled()
    assert notes.errors == []


def test_noise_widget_bad_inputs(viewer, notes):
    nw = dock(viewer, "Noise model")
    nw.set_source("calibration")
    assert not nw.fit()
    assert "no calibration stack layer" in notes.errors[-1]
    viewer.add_image(np.ones((32, 32), np.float32), name="flat2d")
    nw.calib_layer.set_layer("flat2d")
    assert not nw.fit()
    assert "calibration stack is a 3D layer" in notes.errors[-1]
    assert nw.state == TaskState.IDLE and nw.fit_btn.isEnabled()


# -- reader ---------------------------------------------------------------------------------------


def test_opening_a_model_file_registers_it(viewer, notes, tmp_path):
    img = np.random.default_rng(0).normal(50, 5, (64, 64)).astype(np.float32)
    model = tiny_model(img)
    path = tmp_path / "mine.hdn"
    model.save(path)
    pw = dock(viewer, "Predict and explore")
    n_layers = len(viewer.layers)
    viewer.open(str(path), plugin=PLUGIN)
    assert len(viewer.layers) == n_layers  # a model file adds no layer
    assert list(get_session().models) == ["mine"]
    assert pw.model_combo.currentText() == "mine"
    assert "2 levels" in pw.model_info.text()
    assert any("HDN model 'mine' loaded" in m for m in notes.infos)

    nm_path = tmp_path / "cam.hdnoise"
    model.noise_model.save(nm_path)
    viewer.open(str(nm_path), plugin=PLUGIN)
    assert "cam" in get_session().noise_models


def test_opening_a_damaged_model_file_notifies(viewer, notes, tmp_path):
    bad = tmp_path / "broken.hdn"
    bad.write_bytes(b"this is not a model")
    viewer.open(str(bad), plugin=PLUGIN)  # no exception
    assert len(notes.errors) == 1 and "Could not open" in notes.errors[0]
    assert get_session().models == {}


def test_reader_declines_other_files():
    from napari_hdn._reader import get_reader

    assert get_reader("image.tif") is None
    assert get_reader(["a.hdn", "b.hdn"]) is None
    assert get_reader("model.HDN") is not None
