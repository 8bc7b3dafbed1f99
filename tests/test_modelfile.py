import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_hdn.engine import (
    GaussianNoiseModel,
    ModelFileError,
    PoissonGaussianNoiseModel,
    load_model,
    load_noise_model,
)


def test_round_trip_gives_identical_predictions(tiny_model, tmp_path):
    img = np.random.default_rng(0).normal(50, 20, (40, 40)).astype(np.float32)
    before = tiny_model.predict(img, n_samples=3, seed=2, return_samples=True)
    path = tiny_model.save(tmp_path / "m.hdn")
    loaded = load_model(path)
    after = loaded.predict(img, n_samples=3, seed=2, return_samples=True)
    np.testing.assert_array_equal(before.samples, after.samples)
    assert loaded.config == tiny_model.config
    assert loaded.normalisation == tiny_model.normalisation
    assert loaded.noise_model.sigma == 10.0


def test_model_file_holds_no_pickle(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m.hdn")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header["__metadata__"]
    assert json.loads(meta["format"]) == "napari-hdn-model"
    assert json.loads(meta["config"])["levels"] == 2
    assert b"\x80\x04" not in raw[:16]  # not a pickle protocol header


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_gives_clear_error(tiny_model, tmp_path, damage):
    path = tiny_model.save(tmp_path / "m.hdn")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a model at all" * 10)
    else:
        path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a readable napari-hdn model"):
        load_model(path)


def test_foreign_and_missing_files(tmp_path):
    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelFileError, match="without napari-hdn metadata"):
        load_model(foreign)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.hdn")
    nm = tmp_path / "noise.hdnoise"
    GaussianNoiseModel(3.0).save(nm)
    with pytest.raises(ModelFileError, match="napari-hdn-noise-model"):
        load_model(nm)


def test_newer_version_refused(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m.hdn", extra_meta={"format_version": 99})
    with pytest.raises(ModelFileError, match="version 99"):
        load_model(path)


def test_mismatched_weights_refused(tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m.hdn", extra_meta={"config": {
        **tiny_model.config.model_dump(), "filters": 16}})
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(path)


def test_noise_model_files_round_trip(tmp_path):
    pg = PoissonGaussianNoiseModel(2.0, 3.0, 100.0)
    pg.save(tmp_path / "pg.hdnoise")
    back = load_noise_model(tmp_path / "pg.hdnoise")
    assert (back.gain, back.read_noise, back.offset) == (2.0, 3.0, 100.0)
    s = torch.linspace(100, 1000, 7)
    x = s + 5
    assert torch.equal(back.log_likelihood(x, s), pg.log_likelihood(x, s))
