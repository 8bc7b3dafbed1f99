"""Predicting a dask-backed layer in napari: chunk by chunk into a zarr store, in the background,
results added as lazy layers (the input is never loaded whole)."""

from __future__ import annotations

import numpy as np
import pytest
from _widget_helpers import WAIT, dock, tiny_model

from napari_hdn.engine import predict
from napari_hdn.widgets import get_session

da = pytest.importorskip("dask.array")
pytest.importorskip("zarr")

pytestmark = pytest.mark.usefixtures("widget_session")


def test_dask_layer_is_predicted_lazily_into_zarr(viewer, qtbot, notes, monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    img = np.random.default_rng(3).normal(50, 5, (2, 96, 64)).astype(np.float32)

    def whole(*_a, **_k):
        raise AssertionError("the layer's data were read as one numpy array")

    # the in-memory path (which reads layer.data whole) is not taken
    monkeypatch.setattr("napari_hdn.widgets.predict_widget.chosen_model_and_image", whole)
    viewer.add_image(da.from_array(img, chunks=(1, 32, 32)), name="big")
    model = tiny_model(img[0])
    get_session().add_model(model, "tiny")
    pw = dock(viewer, "Predict and explore")
    pw.axes_combo.setCurrentText("TYX")
    pw.n_samples.setValue(2)
    pw.tile.setValue(64)
    assert pw.run_prediction()
    assert pw.task.running  # in the background: the viewer keeps drawing meanwhile
    qtbot.waitUntil(lambda: not pw.task.running, timeout=WAIT)
    assert notes.errors == []
    mmse = viewer.layers["HDN MMSE · big"]
    assert type(mmse.data).__module__.startswith("dask")  # lazy, read from the store
    assert mmse.metadata["hdn"]["store"].endswith(".zarr")
    assert "chunks computed" in pw.status.text()
    want = predict(model, img, n_samples=2, axes="TYX", seed=0)
    np.testing.assert_allclose(np.asarray(mmse.data), want.mmse, rtol=1e-4, atol=1e-3)
