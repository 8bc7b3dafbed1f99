"""Sample data contributions: offline, reproducible, the right layers and shapes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hdn import sample_data

PLUGIN = "napari-hdn"


def test_noisy_fluorescence_has_ground_truth_and_camera():
    (clean, cmeta, ctype), (noisy, nmeta, ntype) = sample_data.noisy_fluorescence_sample()
    assert ctype == ntype == "image"
    assert noisy.shape == clean.shape == (256, 256)
    assert nmeta["name"] == "noisy fluorescence"
    assert cmeta["name"] == "noisy fluorescence ground truth" and cmeta["visible"] is False
    assert nmeta["metadata"]["camera"] == {"gain": 1.0, "read_noise": 2.0, "offset": 100.0}
    # Poisson-Gaussian noise around the truth: residual variance ~ (s - offset) * gain + read^2
    resid = noisy - clean
    expected = np.mean(clean - 100.0) + 4.0
    assert abs(resid.var() / expected - 1) < 0.1
    again = sample_data.noisy_fluorescence_sample()[1][0]
    np.testing.assert_array_equal(noisy, again)  # reproducible


def test_calibration_stack_is_a_static_scene():
    [(stack, meta, kind)] = sample_data.calibration_stack_sample()
    assert kind == "image" and stack.shape == (50, 128, 128)
    assert meta["name"] == "calibration stack"
    mean = stack.mean(0)
    # frames differ only by noise: each frame's deviation from the mean is uncorrelated with it
    dev = stack[0] - mean
    assert abs(np.corrcoef(dev.ravel(), mean.ravel())[0, 1]) < 0.1
    assert stack.std(0).mean() > 2.0


def test_striped_sample_has_row_correlated_noise():
    (clean, _, _), (noisy, meta, _) = sample_data.striped_fluorescence_sample()
    assert meta["name"] == "striped fluorescence" and noisy.shape == (256, 256)
    r = noisy - clean
    r = r - r.mean()
    along_x = np.mean(r[:, 1:] * r[:, :-1]) / r.var()
    along_y = np.mean(r[1:, :] * r[:-1, :]) / r.var()
    assert along_x > 0.2 and abs(along_y) < 0.1  # horizontal stripes


@pytest.mark.parametrize(
    "key, names",
    [("noisy-fluorescence", ["noisy fluorescence ground truth", "noisy fluorescence"]),
     ("calibration-stack", ["calibration stack"]),
     ("striped-fluorescence", ["striped fluorescence ground truth", "striped fluorescence"])],
)
def test_open_sample_in_viewer(make_napari_viewer, key, names):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, key)
    assert [ly.name for ly in viewer.layers] == names
    assert all(ly.data.dtype == np.float32 for ly in viewer.layers)
