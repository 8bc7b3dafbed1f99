import subprocess
import sys

import numpy as np
import pytest
import tifffile
from _helpers import smooth_image

from napari_hdn.cli import main

TINY_ARGS = ["--levels", "2", "--z-dim", "2", "--filters", "8", "--blocks", "1",
             "--patch-size", "32", "--batch-size", "8", "--device", "cpu", "--quiet"]


@pytest.fixture
def noisy_tif(tmp_path):
    rng = np.random.default_rng(0)
    img = np.stack([smooth_image((64, 64), k) for k in range(2)])
    img = (img + rng.normal(0, 10, img.shape)).astype(np.float32)
    path = tmp_path / "noisy.tif"
    tifffile.imwrite(path, img)
    return path


def test_train_then_predict(tmp_path, noisy_tif, capsys):
    model = tmp_path / "m.hdn"
    rc = main(["train", str(noisy_tif), "--gaussian-sigma", "10", "--out", str(model),
               "--max-steps", "3", "--axes", "TYX", *TINY_ARGS])
    assert rc == 0 and model.exists()
    assert (tmp_path / "m.checkpoints" / "last.hdn").exists()
    out = tmp_path / "pred"
    rc = main(["predict", str(model), str(noisy_tif), "--out-dir", str(out), "--samples", "3",
               "--save-samples", "--deactivate", "1", "--deactivate-mode", "zero", "--quiet",
               "--tile-size", "32", "--tile-overlap", "8"])
    assert rc == 0
    assert tifffile.imread(out / "mmse.tif").shape == (2, 64, 64)
    assert tifffile.imread(out / "variance.tif").shape == (2, 64, 64)
    assert tifffile.imread(out / "samples.tif").shape == (3, 2, 64, 64)
    assert "1=zero" in capsys.readouterr().out
    # resume continues from the checkpoint
    rc = main(["train", str(noisy_tif), "--out", str(tmp_path / "m2.hdn"), "--max-steps", "5",
               "--resume", str(tmp_path / "m.checkpoints" / "last.hdn"), "--quiet"])
    assert rc == 0


def test_user_mistakes_exit_cleanly(tmp_path, noisy_tif, capsys):
    rc = main(["train", str(tmp_path / "missing.tif"), "--gaussian-sigma", "1", "--out", "x"])
    assert rc == 1 and "not found" in capsys.readouterr().err
    rc = main(["train", str(noisy_tif), "--gaussian-sigma", "1", "--out", str(tmp_path / "a"),
               "--axes", "QYX", *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 1 and "leading axes" in err and "Traceback" not in err
    rc = main(["train", str(noisy_tif), "--out", str(tmp_path / "a"), *TINY_ARGS])
    assert rc == 1 and "noise model is needed" in capsys.readouterr().err
    bad = tmp_path / "bad.hdn"
    bad.write_bytes(b"junk")
    rc = main(["predict", str(bad), str(noisy_tif), "--out-dir", str(tmp_path / "o")])
    assert rc == 1 and "not a readable napari-hdn model" in capsys.readouterr().err
    rc = main(["train", str(noisy_tif), "--gaussian-sigma", "1", "--out", "x", "--levels", "0"])
    assert rc == 1 and "levels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["predict"])
    assert exc.value.code == 2


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "napari_hdn.cli", "train", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--noise-model", "--gaussian-sigma", "--levels", "--z-dim", "--filters",
                "--blocks", "--patch-size", "--batch-size", "--max-steps", "--val-fraction",
                "--device", "--seed", "--resume"):
        assert opt in out
    out = subprocess.run([sys.executable, "-m", "napari_hdn.cli", "predict", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--samples", "--save-samples", "--tile-size", "--deactivate", "--deactivate-mode"):
        assert opt in out
