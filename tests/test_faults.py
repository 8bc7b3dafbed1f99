"""Fault injection: bad inputs, bad files and failing disks, through the CLI, the API and the reader.

Every row is one probe: what goes in (or what breaks) and what must come out (an exit code and
words of the one-line message, or an exception type). Every probe also asserts that no input
changed (hash before and after), that no traceback was printed, and that no output holding NaN
was written. Models are tiny and untrained (prediction only needs finite weights), so the whole
module runs in seconds.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from _helpers import TINY, smooth_image

from napari_hdn.cli import main
from napari_hdn.engine import (
    GaussianNoiseModel,
    HDNModel,
    HDNWarning,
    InputError,
    ModelConfig,
    ModelFileError,
    Normalisation,
    OptionError,
    OutputError,
    PoissonGaussianNoiseModel,
    load_model,
    load_noise_model,
)
from napari_hdn.engine.files import safeio
from napari_hdn.engine.noise.channels import ChannelNoiseModels

TINY_FIT = ["--quiet", "--no-figure", "--kind", "histogram", "--device", "cpu"]


# -- the inputs every probe shares ------------------------------------------------------------------
def _model(levels=2):
    torch.manual_seed(0)
    return HDNModel(ModelConfig(**{**TINY, "levels": levels}), GaussianNoiseModel(10.0),
                    Normalisation(50.0, 30.0))


def _edited(model, path, meta_change=None, tensor_change=None):
    tensors, meta = model.file_contents()
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    safeio.write_file(path, tensors, meta)


def _nan_weight(t):
    k = next(k for k in t if k.startswith("ladder.") and t[k].is_floating_point())
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    img = np.stack([smooth_image((64, 64), k) for k in range(2)])
    tifffile.imwrite(d / "noisy.tif", (img + rng.normal(0, 10, img.shape)).astype(np.float32))
    tifffile.imwrite(d / "yxt.tif", rng.normal(50, 10, (64, 64, 8)).astype(np.float32))
    tifffile.imwrite(d / "cyx.tif", rng.normal(50, 10, (2, 64, 64)).astype(np.float32),
                     imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(d / "tyx_ij.tif", rng.normal(50, 10, (2, 64, 64)).astype(np.float32),
                     imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(d / "huge.tif", np.full((64, 64), 1e28, np.float32)
                     + rng.normal(0, 1e27, (64, 64)).astype(np.float32))
    clean = 200 + 600 * smooth_image((32, 32), 3) / 100
    frames = clean + rng.normal(0, 20, (24, 32, 32))
    tifffile.imwrite(d / "cal.tif", frames.astype(np.float32))
    drift = frames + np.linspace(0, 400, 24)[:, None, None]  # a bleaching / drifting sample
    tifffile.imwrite(d / "drift.tif", drift.astype(np.float32))
    m = _model()
    m.save(d / "m.hdn")
    GaussianNoiseModel(10.0).save(d / "g.hdnoise")
    ChannelNoiseModels([GaussianNoiseModel(10.0)] * 3).save(d / "g3.hdnoise")
    data = (d / "m.hdn").read_bytes()
    (d / "truncated.hdn").write_bytes(data[: len(data) // 2])
    (d / "junk.hdn").write_bytes(b"junk" * 100)
    (d / "empty.hdn").write_bytes(b"")
    (d / "tiff.hdn").write_bytes((d / "noisy.tif").read_bytes())
    (d / "noise_as_model.hdn").write_bytes((d / "g.hdnoise").read_bytes())
    (d / "model_as_noise.hdnoise").write_bytes(data)
    _edited(m, d / "std0.hdn", lambda mt: mt["normalisation"].update(std=0.0))
    _edited(m, d / "stdnan.hdn", lambda mt: mt["normalisation"].update(std=float("nan")))
    _edited(m, d / "stdstr.hdn", lambda mt: mt["normalisation"].update(std="30"))
    _edited(m, d / "nanweights.hdn", tensor_change=_nan_weight)
    _edited(m, d / "nmstring.hdn", lambda mt: mt.update(noise_model="gaussian"))
    _edited(m, d / "infolist.hdn", lambda mt: mt.update(info=[1, 2]))
    _edited(m, d / "normlist.hdn", lambda mt: mt.update(normalisation=[50, 30]))
    _edited(m, d / "sigma0.hdn", lambda mt: mt["noise_model"]["params"].update(sigma=0.0))
    _edited(m, d / "paramslist.hdn", lambda mt: mt["noise_model"].update(params=[1]))
    _edited(m, d / "badconfig.hdn", lambda mt: mt["config"].update(levels=-1))
    _edited(m, d / "newer.hdn", lambda mt: mt.update(format_version=99))
    _edited(m, d / "missingweight.hdn",
            tensor_change=lambda t: t.pop(next(k for k in t if k.startswith("ladder."))))
    nm_t, nm_meta = {}, {"format": "napari-hdn-noise-model", "format_version": 1,
                         "kind": "gaussian", "params": {"sigma": -1.0}}
    safeio.write_file(d / "negsigma.hdnoise", nm_t, nm_meta)
    safeio.write_file(d / "strkind.hdnoise", {}, {**nm_meta, "kind": ["x"]})
    # an earlier prediction, to be kept or replaced on purpose only
    (d / "old").mkdir()
    for name in ("mmse.tif", "variance.tif"):
        tifffile.imwrite(d / "old" / name, np.zeros((2, 64, 64), np.float32))
    return d


def _hashes(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_nan_outputs(folder: Path) -> None:
    for p in folder.rglob("*.tif"):
        arr = tifffile.imread(p)
        assert np.isfinite(arr).all(), f"{p} holds NaN or infinite values"


def _no_temp_files(*folders: Path) -> None:
    for f in folders:
        if f.exists():
            assert not [p for p in f.rglob(".*.tmp")], f"temporary files left in {f}"


# -- the command line -------------------------------------------------------------------------------
# (id, argv with {in} = inputs folder and {out} = a fresh output folder, exit code, message words)
CLI_ROWS = [
    # data loss: outputs over inputs, existing outputs
    ("train-out-is-input", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                            "{in}/noisy.tif"], 1, "also an input"),
    ("train-out-is-input-overwrite", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                                      "{in}/noisy.tif", "--overwrite"], 1, "also an input"),
    ("train-out-is-noise-model", ["train", "{in}/noisy.tif", "--noise-model", "{in}/g.hdnoise",
                                  "--out", "{in}/g.hdnoise"], 1, "also an input"),
    ("train-out-exists", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                          "{in}/m.hdn"], 1, "--overwrite"),
    ("train-out-is-folder", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                             "{in}/old"], 1, "is a folder"),
    ("train-out-under-a-file", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                                "{in}/noisy.tif/m.hdn"], 1, "not a folder"),
    ("train-out-in-proc", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                           "/proc/hdn-probe.hdn"], 1, "cannot write"),
    ("predict-over-own-input", ["predict", "{in}/m.hdn", "{in}/old/mmse.tif", "--out-dir",
                                "{in}/old", "--samples", "2", "--overwrite"], 1, "also an input"),
    ("predict-outputs-exist", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir", "{in}/old",
                               "--samples", "2"], 1, "--overwrite"),
    ("predict-out-dir-is-file", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir",
                                 "{in}/noisy.tif"], 1, "not a folder"),
    ("fit-out-is-calibration", ["noise-model", "fit", "--calibration", "{in}/cal.tif", "--out",
                                "{in}/cal.tif", *TINY_FIT], 1, "also an input"),
    ("fit-out-exists", ["noise-model", "fit", "--calibration", "{in}/cal.tif", "--out",
                        "{in}/g.hdnoise", *TINY_FIT], 1, "--overwrite"),
    ("fit-figure-is-input", ["noise-model", "fit", "--calibration", "{in}/cal.tif", "--out",
                             "{out}/c.hdnoise", "--figure", "{in}/cal.tif", "--quiet"], 1,
     "also an input"),
    ("describe-figure-is-input", ["noise-model", "describe", "{in}/g.hdnoise", "--figure",
                                  "{in}/g.hdnoise"], 1, "also an input"),
    # numbers out of range: one line naming the option
    ("predict-batch-negative", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir", "{out}",
                                "--batch-size", "-3"], 1, "--batch-size must be at least 1"),
    ("predict-samples-0", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir", "{out}",
                           "--samples", "0"], 1, "--samples"),
    ("predict-overlap-negative", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir", "{out}",
                                  "--tile-size", "32", "--tile-overlap", "-100"], 1,
     "--tile-overlap"),
    ("predict-tile-2", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir", "{out}",
                        "--tile-size", "2"], 1, "--tile-size must be at least"),
    ("predict-threads-0", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir", "{out}",
                           "--threads", "0"], 1, "--threads"),
    ("predict-all-levels-off", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir", "{out}",
                                "--deactivate", "1,2"], 1, "every latent level"),
    ("predict-level-missing", ["predict", "{in}/m.hdn", "{in}/noisy.tif", "--out-dir", "{out}",
                               "--deactivate", "7"], 1, "does not exist"),
    ("train-sigma-negative", ["train", "{in}/noisy.tif", "--gaussian-sigma", "-5", "--out",
                              "{out}/m.hdn"], 1, "--gaussian-sigma must be greater than 0"),
    ("train-sigma-0", ["train", "{in}/noisy.tif", "--gaussian-sigma", "0", "--out", "{out}/m.hdn"],
     1, "--gaussian-sigma"),
    ("train-sigma-nan", ["train", "{in}/noisy.tif", "--gaussian-sigma", "nan", "--out",
                         "{out}/m.hdn"], 1, "finite"),
    ("train-gain-0", ["train", "{in}/noisy.tif", "--poisson-gain", "0", "--out", "{out}/m.hdn"], 1,
     "--poisson-gain"),
    ("train-read-noise-negative", ["train", "{in}/noisy.tif", "--poisson-gain", "2",
                                   "--read-noise", "-3", "--out", "{out}/m.hdn"], 1,
     "--read-noise must be at least 0"),
    ("train-batch-0", ["train", "{in}/noisy.tif", "--gaussian-sigma", "1", "--batch-size", "0",
                       "--out", "{out}/m.hdn"], 1, "--batch-size"),
    ("train-minutes-inf", ["train", "{in}/noisy.tif", "--gaussian-sigma", "1", "--minutes", "inf",
                           "--out", "{out}/m.hdn"], 1, "--minutes"),
    ("train-lr-nan", ["train", "{in}/noisy.tif", "--gaussian-sigma", "1", "--lr", "nan",
                      "--out", "{out}/m.hdn"], 1, "--lr"),
    ("train-values-1e28", ["train", "{in}/huge.tif", "--gaussian-sigma", "1", "--out",
                           "{out}/m.hdn", "--device", "cpu", "--quiet"], 1, "rescale"),
    ("train-resume-with-sigma", ["train", "{in}/noisy.tif", "--gaussian-sigma", "3", "--resume",
                                 "{in}/m.hdn", "--out", "{out}/m.hdn"], 1, "keeps the noise model"),
    ("fit-gaussians-0", ["noise-model", "fit", "--calibration", "{in}/cal.tif", "--out",
                         "{out}/c.hdnoise", "--gaussians", "0", *TINY_FIT], 1, "--gaussians"),
    ("fit-val-fraction-1", ["noise-model", "fit", "--calibration", "{in}/cal.tif", "--out",
                            "{out}/c.hdnoise", "--val-fraction", "1", *TINY_FIT], 1,
     "--val-fraction"),
    ("demo-minutes-negative", ["demo", "--out-dir", "{out}", "--minutes", "-1"], 1, "--minutes"),
    # axes
    # channels: a channel count that does not fit, a C axis in the wrong place
    ("train-imagej-cyx-3-noise-models", ["train", "{in}/cyx.tif", "--noise-model",
                                         "{in}/g3.hdnoise", "--out", "{out}/m.hdn"], 1,
     "3 noise model(s) for an image with 2 channels"),
    ("predict-imagej-cyx", ["predict", "{in}/m.hdn", "{in}/cyx.tif", "--out-dir", "{out}"], 1,
     "trained on one channel, but"),
    ("fit-imagej-cyx", ["noise-model", "fit", "--calibration", "{in}/cyx.tif", "--out",
                        "{out}/c.hdnoise", *TINY_FIT], 1, "stack of frames"),
    ("train-axes-ycx", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--axes", "YCX",
                        "--out", "{out}/m.hdn"], 1, "goes before Y and X"),
    # bad model and noise-model files
    *[(f"predict-{name}", ["predict", f"{{in}}/{name}.hdn", "{in}/noisy.tif", "--out-dir", "{out}"],
       1, words) for name, words in [
        ("truncated", "not a readable"), ("junk", "not a readable"), ("empty", "not a readable"),
        ("tiff", "not a readable"), ("noise_as_model", "not a napari-hdn model"),
        ("std0", "normalisation std"), ("stdnan", "normalisation std"),
        ("stdstr", "normalisation std"), ("nanweights", "NaN or infinite"),
        ("nmstring", "noise_model is a str"), ("infolist", "info is a list"),
        ("normlist", "normalisation is a list"), ("sigma0", "sigma"),
        ("paramslist", "parameters are invalid"), ("badconfig", "invalid"),
        ("newer", "version 99"), ("missingweight", "do not match"), ("missing", "not found"),
    ]],
    ("resume-nanweights", ["train", "{in}/noisy.tif", "--resume", "{in}/nanweights.hdn", "--out",
                           "{out}/m.hdn"], 1, "NaN or infinite"),
    ("train-noise-model-is-model", ["train", "{in}/noisy.tif", "--noise-model",
                                    "{in}/model_as_noise.hdnoise", "--out", "{out}/m.hdn"], 1,
     "not a napari-hdn noise model"),
    ("describe-negsigma", ["noise-model", "describe", "{in}/negsigma.hdnoise"], 1, "sigma"),
    ("describe-strkind", ["noise-model", "describe", "{in}/strkind.hdnoise"], 1,
     "unknown noise model kind"),
    ("describe-folder", ["noise-model", "describe", "{in}/old"], 1, "folder"),
    ("predict-input-folder", ["predict", "{in}/m.hdn", "{in}/old", "--out-dir", "{out}"], 1,
     "folder"),
    ("predict-input-not-tiff", ["predict", "{in}/m.hdn", "{in}/m.hdn", "--out-dir", "{out}"], 1,
     "could not read"),
]


def _fill(argv, inp: Path, out: Path) -> list[str]:
    return [a.replace("{in}", str(inp)).replace("{out}", str(out)) for a in argv]


@pytest.mark.parametrize("argv,code,words", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_probe(inputs, tmp_path, capsys, argv, code, words):
    out = tmp_path / "out"
    before = _hashes(inputs)
    rc = main(_fill(argv, inputs, out))
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("napari-hdn: error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert _hashes(inputs) == before, "an input changed"
    _no_nan_outputs(tmp_path)
    _no_temp_files(inputs, tmp_path)
    assert not (out / "mmse.tif").exists() and not (out / "m.hdn").exists()


# -- what must work, and say so ------------------------------------------------------------------
def test_predict_overwrites_only_when_asked_and_keeps_inputs(inputs, tmp_path, capsys):
    out = tmp_path / "pred"
    args = ["predict", str(inputs / "m.hdn"), str(inputs / "noisy.tif"), "--out-dir", str(out),
            "--samples", "2", "--quiet"]
    before = _hashes(inputs)
    assert main(args) == 0
    first = _hashes(out)
    assert set(map(str, first)) == {"mmse.tif", "variance.tif"}
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert _hashes(out) == first
    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    assert _hashes(out) != first and _hashes(inputs) == before
    _no_nan_outputs(out)
    mode = (out / "mmse.tif").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask, oct(mode)  # not mkstemp's 0600


def test_imagej_axes_are_read_and_a_short_last_axis_is_warned(inputs, tmp_path, capsys):
    rc = main(["predict", str(inputs / "m.hdn"), str(inputs / "yxt.tif"), "--out-dir",
               str(tmp_path / "a"), "--samples", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0 and "napari-hdn: warning:" in err and "much shorter" in err
    # an ImageJ TYX file: two frames, without --axes and without a warning
    rc = main(["predict", str(inputs / "m.hdn"), str(inputs / "tyx_ij.tif"), "--out-dir",
               str(tmp_path / "b"), "--samples", "1", "--quiet"])
    assert rc == 0 and "warning" not in capsys.readouterr().err
    assert tifffile.imread(tmp_path / "b" / "mmse.tif").shape == (2, 64, 64)


def test_drifting_calibration_is_called_non_stationary(inputs, tmp_path, capsys):
    for name, drifting in (("cal", False), ("drift", True)):
        out = tmp_path / f"{name}.hdnoise"
        rc = main(["noise-model", "fit", "--calibration", str(inputs / f"{name}.tif"), "--out",
                   str(out), *TINY_FIT])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert ("not stationary" in cap.out + cap.err) is drifting
        if drifting:
            assert "verdict: suspicious" in cap.out


# -- disk full, read-only folders, killed and concurrent writers -----------------------------------
class _FullDisk:
    """A file object that takes ``room`` bytes and then fails like a full disk."""

    def __init__(self, fh, room: int):
        self._fh, self._room = fh, room

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if self._fh.tell() + n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.fixture
def full_disk(monkeypatch):
    real = safeio._open_tmp

    def opener(path):
        tmp, fh = real(path)
        return tmp, _FullDisk(fh, 4096)

    monkeypatch.setattr(safeio, "_open_tmp", opener)


@pytest.fixture
def read_only(monkeypatch):
    def opener(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(safeio, "_open_tmp", opener)


WRITE_ROWS = [
    ("predict", lambda d, i: ["predict", str(i / "m.hdn"), str(i / "noisy.tif"), "--out-dir",
                              str(d), "--samples", "1", "--quiet", "--overwrite"], "mmse.tif"),
    ("train", lambda d, i: ["train", str(i / "noisy.tif"), "--gaussian-sigma", "10", "--out",
                            str(d / "m.hdn"), "--max-steps", "1", "--levels", "2", "--z-dim", "2",
                            "--filters", "8", "--blocks", "1", "--patch-size", "32",
                            "--batch-size", "2", "--device", "cpu", "--quiet", "--overwrite"],
     "m.hdn"),
    ("fit", lambda d, i: ["noise-model", "fit", "--calibration", str(i / "cal.tif"), "--out",
                          str(d / "m.hdnoise"), *TINY_FIT, "--overwrite"], "m.hdnoise"),
]


@pytest.mark.parametrize("make,target", [r[1:] for r in WRITE_ROWS], ids=[r[0] for r in WRITE_ROWS])
def test_disk_full_keeps_the_previous_file(inputs, tmp_path, capsys, request, make, target):
    previous = b"the previous result"
    (tmp_path / target).write_bytes(previous)
    before = _hashes(inputs)
    request.getfixturevalue("full_disk")
    rc = main(make(tmp_path, inputs))
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("napari-hdn: error:")]
    assert len(line) == 1 and "disk full" in line[0] and "was not written" in line[0]
    if target in line[0]:
        assert "previous file is unchanged" in line[0]
    assert (tmp_path / target).read_bytes() == previous
    assert _hashes(inputs) == before
    _no_temp_files(tmp_path)


def test_read_only_destination_is_found_before_any_work(inputs, tmp_path, capsys, read_only):
    rc = main(["train", str(inputs / "noisy.tif"), "--gaussian-sigma", "10", "--out",
               str(tmp_path / "m.hdn"), "--max-steps", "100000"])  # would train for hours
    err = capsys.readouterr().err
    assert rc == 1 and "read-only file system" in err and "Traceback" not in err
    assert not (tmp_path / "m.checkpoints").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_permission_denied_folder(inputs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc = main(["predict", str(inputs / "m.hdn"), str(inputs / "noisy.tif"), "--out-dir",
                   str(locked)])
        assert rc == 1 and "permission denied" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_kill_minus_9_while_writing_a_model_leaves_the_old_or_the_new_file(tmp_path):
    target = tmp_path / "m.hdn"
    big = HDNModel(ModelConfig(levels=2, z_dim=8, filters=64, blocks=2), GaussianNoiseModel(1.0),
                   Normalisation(0.0, 1.0))
    big.save(target)
    code = ("import sys, torch\n"
            "from napari_hdn.engine import load_model\n"
            "m = load_model(sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    m.normalisation.mean += 1.0\n"
            "    m.save(sys.argv[1])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        threading.Event().wait(0.5)
    finally:
        proc.kill()
        proc.wait()
    m = load_model(target)  # complete and valid: never half written
    assert m.normalisation.mean >= 0.0


def test_concurrent_writers_to_one_output(tmp_path):
    target = tmp_path / "m.hdnoise"
    errors = []

    def writer(sigma):
        try:
            for _ in range(20):
                GaussianNoiseModel(sigma).save(target)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1.0, 2.0, 3.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert load_noise_model(target).sigma in (1.0, 2.0, 3.0)
    _no_temp_files(tmp_path)


# -- the Python API ------------------------------------------------------------------------------
def _img():
    return smooth_image((64, 64), 1) + np.random.default_rng(1).normal(0, 10, (64, 64))


def _nan_model():
    m = _model()
    with torch.no_grad():
        next(m.ladder.parameters()).fill_(float("nan"))
    return m


API_ROWS = [
    ("predict-batch-negative", lambda i: _model().predict(_img(), 2, batch_size=-1), InputError,
     "batch_size= must be at least 1"),
    ("predict-samples-0", lambda i: _model().predict(_img(), 0), InputError, "n_samples="),
    ("predict-overlap-negative", lambda i: _model().predict(_img(), 1, tile_size=32,
                                                            tile_overlap=-100), InputError,
     "tile_overlap="),
    ("predict-tile-float-nan", lambda i: _model().predict(_img(), 1, tile_size=float("nan")),
     InputError, "tile_size="),
    ("predict-all-off", lambda i: _model().predict(_img(), 1, levels={1: "zero", 2: "zero"}),
     InputError, "every latent level"),
    ("predict-nan-model", lambda i: _nan_model().predict(_img(), 1), InputError,
     "NaN or infinite"),
    ("predict-not-a-model", lambda i: __import__("napari_hdn").predict(42, _img()), InputError,
     "HDNModel"),
    ("predict-missing-path", lambda i: __import__("napari_hdn").predict(str(i / "nope.hdn"),
                                                                         _img()),
     ModelFileError, "not found"),
    ("gaussian-0", lambda i: GaussianNoiseModel(0), InputError, "sigma="),
    ("gaussian-nan", lambda i: GaussianNoiseModel(float("nan")), InputError, "finite"),
    ("gaussian-str", lambda i: GaussianNoiseModel("ten"), InputError, "a number"),
    ("poisson-gain-0", lambda i: PoissonGaussianNoiseModel(0, 1), InputError, "gain="),
    ("poisson-read-negative", lambda i: PoissonGaussianNoiseModel(1, -3), InputError,
     "read_noise="),
    ("train-levels-0", lambda i: __import__("napari_hdn").train(_img(), GaussianNoiseModel(1),
                                                                 levels=0), InputError, "levels"),
    ("train-lr-nan", lambda i: __import__("napari_hdn").train(_img(), GaussianNoiseModel(1),
                                                               lr=float("nan")), InputError, "lr"),
    ("train-unknown-option", lambda i: __import__("napari_hdn").train(_img(), GaussianNoiseModel(1),
                                                                       levles=3), OptionError,
     "unknown training option"),
    ("train-values-1e28", lambda i: __import__("napari_hdn").train(
        np.full((64, 64), 1e28) + _img() * 1e26, GaussianNoiseModel(1), **TINY, patch_size=32,
        max_steps=1, device="cpu"), InputError, "rescale"),
    ("train-values-1e300", lambda i: __import__("napari_hdn").train(
        np.full((64, 64), 1e300), GaussianNoiseModel(1), max_steps=1), InputError, "rescale"),
    ("load-std0", lambda i: load_model(i / "std0.hdn"), ModelFileError, "normalisation std"),
    ("load-nmstring", lambda i: load_model(i / "nmstring.hdn"), ModelFileError, "noise_model"),
    ("load-missing", lambda i: load_model(i / "nope.hdn"), ModelFileError, "not found"),
    ("load-noise-negsigma", lambda i: load_noise_model(i / "negsigma.hdnoise"), ModelFileError,
     "sigma"),
    ("save-into-a-file", lambda i: _model().save(i / "noisy.tif" / "m.hdn"), OutputError,
     "cannot write"),
    ("save-over-a-folder", lambda i: _model().save(i / "old"), OutputError, "is a folder"),
    ("write-nan-tiff", lambda i: safeio.write_tiff(i / "nan-out.tif", np.full((4, 4), np.nan)),
     OutputError, "NaN"),
]


@pytest.mark.parametrize("call,exc_type,words", [r[1:] for r in API_ROWS],
                         ids=[r[0] for r in API_ROWS])
def test_api_probe(inputs, call, exc_type, words):
    before = _hashes(inputs)
    with pytest.raises(exc_type, match=words.replace("(", r"\(")) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(inputs)
    from napari_hdn.engine import HDNError

    assert isinstance(info.value, HDNError)  # the package's own type, also a built-in one
    assert _hashes(inputs) == before
    assert not (inputs / "nan-out.tif").exists()


def test_api_warns_about_a_short_last_axis_and_predicts_from_a_path(inputs):
    import napari_hdn

    with pytest.warns(HDNWarning, match="much shorter"):
        napari_hdn.to_frames(np.zeros((128, 128, 10)) + _img()[:1, :1])
    res = napari_hdn.predict(str(inputs / "m.hdn"), _img(), 2)
    assert np.isfinite(res.mmse).all() and res.mmse.shape == (64, 64)


def test_stationarity_report_numbers():
    from napari_hdn.engine.noise.pairs import stationarity_report

    rng = np.random.default_rng(0)
    still = rng.normal(100, 20, (40, 32, 32))
    assert stationarity_report(still)["stationary"] is True
    bleach = still + np.linspace(0, 200, 40)[:, None, None]
    r = stationarity_report(bleach)
    # a linear trend of 200 over the stack has the variance 200**2 / 12 = 3333 next to the noise's
    # 400: 89 % of the apparent variance
    assert r["stationary"] is False and math.isclose(r["inflation"], 3333 / 3733, rel_tol=0.1)
    assert "not stationary" in r["message"]


# -- the napari reader -----------------------------------------------------------------------------
READER_FILES = ["truncated.hdn", "junk.hdn", "empty.hdn", "tiff.hdn", "noise_as_model.hdn",
                "std0.hdn", "stdnan.hdn", "nanweights.hdn", "nmstring.hdn", "infolist.hdn",
                "normlist.hdn", "sigma0.hdn", "paramslist.hdn", "badconfig.hdn", "newer.hdn",
                "missingweight.hdn", "missing.hdn", "model_as_noise.hdnoise", "negsigma.hdnoise",
                "strkind.hdnoise"]


@pytest.mark.parametrize("name", READER_FILES)
def test_reader_probe(inputs, monkeypatch, name):
    from napari.utils import notifications

    from napari_hdn import _reader

    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda m: shown.append(("error", m)))
    monkeypatch.setattr(notifications, "show_info", lambda m: shown.append(("info", m)))
    before = _hashes(inputs)
    reader = _reader.get_reader(str(inputs / name))
    assert reader is not None
    assert reader(str(inputs / name)) == [(None,)]
    assert [k for k, _ in shown] == ["error"], shown  # never "loaded"
    assert "Could not open" in shown[0][1]
    assert _hashes(inputs) == before


def test_save_dialog_asks_before_replacing_the_file_it_adds_a_suffix_to(tmp_path, monkeypatch):
    from napari_hdn.widgets import _forms

    (tmp_path / "m.hdn").write_bytes(b"a colleague's model")
    monkeypatch.setattr(_forms.QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a: (str(tmp_path / "m"), "")))
    asked = []
    monkeypatch.setattr(_forms.QMessageBox, "question", staticmethod(
        lambda *a: asked.append(a[2]) or _forms.QMessageBox.StandardButton.No))
    assert _forms.ask_save(None, "Save HDN model", "m.hdn", "*.hdn", ".hdn") is None
    assert asked and "m.hdn already exists" in asked[0]
    assert (tmp_path / "m.hdn").read_bytes() == b"a colleague's model"


def test_warnings_with_numbers_before_the_work_starts(inputs, tmp_path):
    import napari_hdn

    far = _img() * 10 + 5000  # uint16-like data of another camera, into a model trained at 50 +- 30
    with pytest.warns(HDNWarning, match=r"far from the data the model was trained on \(mean 50"):
        napari_hdn.predict(_model(), far, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HDNWarning)
        napari_hdn.predict(_model(), _img(), 1)  # data like the training data: no warning
    with pytest.warns(HDNWarning, match="at or below the Poisson-Gaussian offset 100"):
        napari_hdn.train(-_img(), PoissonGaussianNoiseModel(2.0, 3.0, 100.0), **TINY,
                         patch_size=32, batch_size=2, max_steps=1, val_fraction=0.0, device="cpu")


def test_kill_minus_9_mid_predict_keeps_the_previous_result(inputs, tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "mmse.tif").write_bytes(b"the previous result")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "napari_hdn.cli", "predict",
                             str(inputs / "m.hdn"), str(inputs / "noisy.tif"), "--out-dir",
                             str(out), "--samples", "100000", "--overwrite"],
                            stderr=subprocess.PIPE, env=env)
    try:
        proc.stderr.read(1)  # the progress bar has started: sampling is under way
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert (out / "mmse.tif").read_bytes() == b"the previous result"
    assert not (out / "variance.tif").exists()
