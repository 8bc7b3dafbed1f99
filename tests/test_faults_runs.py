"""Faults of runs: concurrent runs that must not mix, stop signals, resume, broken noise models.

In the style of ``test_faults.py``: table rows of a command line and the words of its one-line
message, each checked for the exit code, no traceback, inputs unchanged and nothing left behind
(no lock file, no temporary file, no checkpoint folder of a refused run); then the cases that
need a second process (a run still writing, SIGTERM mid-training) or a widget.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from _helpers import TINY, smooth_image
from test_faults import _hashes, _no_temp_files

from napari_hdn.cli import main
from napari_hdn.engine import (
    GaussianNoiseModel,
    HDNWarning,
    InputError,
    PoissonGaussianNoiseModel,
    StopFlag,
    load_model,
    train,
)
from napari_hdn.engine.files import locks as locks_module
from napari_hdn.engine.files import safeio
from napari_hdn.engine.files.locks import OutputLockedError, lock_file, output_lock, output_locks
from napari_hdn.engine.noise import GMMNoiseModel, fit_noise_model
from napari_hdn.engine.noise.diagnostics import check_noise_model, noise_model_problem
from napari_hdn.engine.training.checkpoints import check_steps_left, checkpoint_state

TINY_ARGS = ["--levels", "2", "--z-dim", "2", "--filters", "8", "--blocks", "1", "--patch-size",
             "32", "--batch-size", "8", "--device", "cpu", "--quiet", "--axes", "TYX"]
RESUME_ARGS = ["--device", "cpu", "--quiet", "--axes", "TYX"]
FIT = ["--quiet", "--no-figure", "--kind", "histogram", "--device", "cpu"]
SRC = str(Path(__file__).parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}


def _noise_file(path, kind, params, tensors=None):
    safeio.write_file(path, tensors or {}, {"format": "napari-hdn-noise-model",
                                            "format_version": 1, "kind": kind, "params": params})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("run-inputs")
    rng = np.random.default_rng(0)
    img = np.stack([smooth_image((64, 64), k) for k in range(2)])
    tifffile.imwrite(d / "noisy.tif", (img + rng.normal(0, 10, img.shape)).astype(np.float32))
    other = 3 * np.stack([smooth_image((64, 64), k + 5) for k in range(2)])
    tifffile.imwrite(d / "other.tif", (other + rng.normal(0, 10, img.shape)).astype(np.float32))
    clean = 200 + 600 * smooth_image((32, 32), 3) / 100
    frames = clean + rng.normal(0, 20, (24, 32, 32))
    tifffile.imwrite(d / "cal.tif", frames.astype(np.float32))
    tifffile.imwrite(d / "tiny-values.tif", (frames * 1e-30).astype(np.float32))
    # a run of 4 steps: its checkpoint is at step 4
    ck = d / "run"
    assert main(["train", str(d / "noisy.tif"), "--gaussian-sigma", "10", "--out",
                 str(ck / "m.hdn"), "--max-steps", "4", "--steps-per-epoch", "2",
                 *TINY_ARGS]) == 0
    # noise models whose numbers give NaN or infinity, though every parameter is finite
    theta = torch.zeros(3, 2, 2)
    theta[2] = 200.0  # exp(200) overflows float32: variance inf, std NaN
    GMMNoiseModel((0.0, 100.0), 2, 1, 1.0, 10.0, theta=theta).save(d / "gmm-inf.hdnoise")
    _noise_file(d / "sigma-tiny.hdnoise", "gaussian", {"sigma": 1e-200})  # sigma**2 -> 0
    GaussianNoiseModel(10.0).save(d / "g.hdnoise")
    (d / "folder").mkdir()
    (d / "folder" / "last.hdn").mkdir()  # in the way of a checkpoint
    return d


def _fill(argv, inp: Path, out: Path) -> list[str]:
    return [a.replace("{in}", str(inp)).replace("{out}", str(out)) for a in argv]


CK = "{in}/run/m.checkpoints/last.hdn"
CLI_ROWS = [
    # resume that would train nothing: said before any work, naming the option and the step
    ("resume-max-steps-below", ["train", "{in}/noisy.tif", "--resume", CK, "--max-steps", "2",
                                "--out", "{out}/m.hdn", *RESUME_ARGS], 1,
     "at step 4; --max-steps 2 would train nothing: give --max-steps above 4"),
    ("resume-max-steps-equal", ["train", "{in}/noisy.tif", "--resume", CK, "--max-steps", "4",
                                "--out", "{out}/m.hdn", *RESUME_ARGS], 1, "above 4"),
    ("resume-finished-run", ["train", "{in}/noisy.tif", "--resume", CK, "--out", "{out}/m.hdn",
                             *RESUME_ARGS], 1, "the end of its run (max_steps 4)"),
    ("resume-budget-spent", ["train", "{in}/noisy.tif", "--resume", CK, "--max-steps", "50",
                             "--minutes", "0.00001", "--out", "{out}/m.hdn", *RESUME_ARGS], 1,
     "--minutes 1e-05 would train nothing"),
    # a checkpoint folder that collides with --out or holds a folder in the way: found before
    ("out-is-checkpoint-dir", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                               "{out}/m.hdn", "--checkpoint-dir", "{out}/m.hdn", *TINY_ARGS], 1,
     "also the checkpoint folder"),
    ("out-named-like-the-default-dir", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10",
                                        "--out", "{out}/m.checkpoints", *TINY_ARGS], 1,
     "also the checkpoint folder"),
    ("out-is-best-checkpoint", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                                "{out}/ck/best.hdn", "--checkpoint-dir", "{out}/ck", *TINY_ARGS],
     1, "inside the checkpoint folder"),
    ("out-is-last-checkpoint", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                                "{out}/last.hdn", "--checkpoint-dir", "{out}", *TINY_ARGS], 1,
     "writes its own last.hdn"),
    ("checkpoint-name-is-a-folder", ["train", "{in}/noisy.tif", "--gaussian-sigma", "10", "--out",
                                     "{out}/m.hdn", "--checkpoint-dir", "{in}/folder",
                                     "--overwrite", *TINY_ARGS], 1,
     "last.hdn is a folder where training writes"),
    # noise models whose numbers are NaN: refused before training, and by describe
    *[(f"train-{name}", ["train", "{in}/noisy.tif", "--noise-model", f"{{in}}/{name}.hdnoise",
                         "--out", "{out}/m.hdn", "--max-steps", "100000", *TINY_ARGS], 1,
       f"{name}.hdnoise is broken: {words}")
      for name, words in [("gmm-inf", "its noise std is nan"), ("sigma-tiny", "its noise std is 0")]],
    *[(f"describe-{name}", ["noise-model", "describe", f"{{in}}/{name}.hdnoise"], 1, "is broken")
      for name in ("gmm-inf", "sigma-tiny")],
    ("train-sigma-tiny-option", ["train", "{in}/noisy.tif", "--gaussian-sigma", "1e-200", "--out",
                                 "{out}/m.hdn", "--max-steps", "100000", *TINY_ARGS], 1,
     "the noise model is broken"),
    # a fit that would save a model of NaN stds (values below float32's resolution)
    ("fit-values-1e-30", ["noise-model", "fit", "--calibration", "{in}/tiny-values.tif", "--out",
                          "{out}/c.hdnoise", "--quiet", "--no-figure", "--kind", "gmm",
                          "--device", "cpu"], 1, "rescale the data"),
]


@pytest.mark.parametrize("argv,code,words", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_probe(inputs, tmp_path, capsys, argv, code, words):
    out = tmp_path / "out"
    before = _hashes(inputs)
    t0 = time.perf_counter()
    rc = main(_fill(argv, inputs, out))
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("napari-hdn: error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert _hashes(inputs) == before, "an input changed"
    assert time.perf_counter() - t0 < 10, "refused only after some work"
    assert not list(tmp_path.rglob("*.lock")) and not list(inputs.rglob("*.lock"))
    assert not list(tmp_path.rglob("*.hdn")) and not list(tmp_path.rglob("*.checkpoints"))
    _no_temp_files(tmp_path, inputs)


# -- two runs, one output --------------------------------------------------------------------------
def _train_argv(inputs, out, *more):
    return ["train", str(inputs / "noisy.tif"), "--gaussian-sigma", "10", "--out", str(out),
            "--max-steps", "1", *TINY_ARGS, *more]


def test_a_second_run_on_a_held_output_is_refused_naming_the_first(inputs, tmp_path, capsys):
    out = tmp_path / "m.hdn"
    pid = str(os.getpid())
    cases = [  # (the output held, the command that writes it)
        (out, _train_argv(inputs, out)),
        (tmp_path / "m.checkpoints", _train_argv(inputs, tmp_path / "other.hdn", "--checkpoint-dir",
                                                 str(tmp_path / "m.checkpoints"))),
        (tmp_path / "m.checkpoints", _train_argv(inputs, out)),  # its default checkpoint folder
        (tmp_path / "n.hdnoise", ["noise-model", "fit", "--calibration", str(inputs / "cal.tif"),
                                  "--out", str(tmp_path / "n.hdnoise"), *FIT]),
        (tmp_path / "ft.hdn", ["train", str(inputs / "noisy.tif"), "--fine-tune",
                               str(inputs / "run" / "m.hdn"), "--deactivate", "1", "--out",
                               str(tmp_path / "ft.hdn"), "--max-steps", "1", *RESUME_ARGS]),
    ]
    for held, argv in cases:
        with output_lock(held):  # another run (this process, through another descriptor)
            rc = main(argv)
            err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err, err
        line = [ln for ln in err.splitlines() if ln.startswith("napari-hdn: error:")]
        assert len(line) == 1 and f"is being written by process {pid}" in line[0], err
        assert "wait for it to finish or choose another --" in line[0]
        assert not out.exists() and not (tmp_path / "m.checkpoints").exists()
    assert not list(tmp_path.rglob("*.lock"))
    assert main(_train_argv(inputs, out)) == 0  # free again: the run goes ahead
    assert not list(tmp_path.rglob("*.lock"))  # and gives its locks back


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_note(inputs, tmp_path, capsys):
    out = tmp_path / "m.hdn"
    pid = _dead_pid()
    for path in (out, tmp_path / "m.checkpoints"):
        lock_file(path).write_text(f'{{"pid": {pid}, "host": "somewhere", "started": "then"}}')
    assert main(_train_argv(inputs, out)) == 0
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "no longer running" in ln]
    assert len(notes) == 2 and f"process {pid} on somewhere" in notes[0], err
    assert not list(tmp_path.rglob("*.lock")) and load_model(out).info["steps"] == 1


def test_locks_without_flock_use_the_process_id(tmp_path, monkeypatch):
    """Where flock is missing: an exclusive file, whose holder is checked by its process id."""
    monkeypatch.setattr(locks_module, "fcntl", None)
    target = tmp_path / "x.zarr"  # a folder output (a zarr store) takes a lock the same way
    with output_lock(target, hint="choose another --out"):
        assert lock_file(target).exists()
        with pytest.raises(OutputLockedError, match=f"process {os.getpid()}"):
            output_lock(target).__enter__()
    assert not lock_file(target).exists()
    lock_file(target).write_text(f'{{"pid": {_dead_pid()}, "host": "{os.uname().nodename}"}}')
    said = []
    with output_lock(target, note=said.append):
        pass
    assert said and "no longer running" in said[0]


def test_locks_all_or_none_and_inherited_by_children(tmp_path, monkeypatch):
    a, b = tmp_path / "a.hdn", tmp_path / "b.hdn"
    with output_lock(b):
        with pytest.raises(OutputLockedError):
            with output_locks([(a, "a", ""), (b, "b", "")]):
                pass
        assert not lock_file(a).exists()  # the one taken was given back
        # a process started by the holder to do its work (a torchrun rank) writes under its lock
        monkeypatch.setenv(locks_module.LOCK_ENV, str(os.getpid()))
        with output_lock(b):
            pass
        assert lock_file(b).exists()  # still the holder's
    assert not lock_file(b).exists()


def test_a_lock_in_a_read_only_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(safeio.OutputError, match="cannot create the lock file"):
            output_lock(ro / "m.hdn").__enter__()
    finally:
        ro.chmod(0o755)


# -- stop signals ----------------------------------------------------------------------------------
def _popen(*argv):
    return subprocess.Popen([sys.executable, "-m", "napari_hdn.cli", *argv],
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for(path: Path, proc, seconds=60):
    t_end = time.time() + seconds
    while not path.exists() and time.time() < t_end and proc.poll() is None:
        time.sleep(0.1)
    assert path.exists(), proc.stderr.read() if proc.poll() is not None else f"no {path}"


def test_sigterm_mid_training_saves_the_best_model_and_the_run_holds_its_output(inputs, tmp_path,
                                                                                capsys):
    """SIGTERM (a scheduler ending the job) stops like Ctrl-C: the best model so far is saved,
    the message says so, exit 130. While the run trains, a second one on its --out is refused."""
    out = tmp_path / "m.hdn"
    proc = _popen("train", str(inputs / "noisy.tif"), "--gaussian-sigma", "10", "--out", str(out),
                  "--max-steps", "100000", "--steps-per-epoch", "2", *TINY_ARGS)
    try:
        _wait_for(tmp_path / "m.checkpoints" / "last.hdn", proc)
        rc = main(_train_argv(inputs, out, "--overwrite"))  # even with --overwrite
        err = capsys.readouterr().err
        assert rc == 1 and f"being written by process {proc.pid}" in err, err
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "SIGTERM received" in err and "stopped at step" in err and "Traceback" not in err
    m = load_model(out)
    assert m.info["stopped_early"] is True and 0 < m.info["steps"] < 100000
    best = load_model(tmp_path / "m.checkpoints" / "best.hdn")  # the model saved is the best
    for k, v in m.ladder.state_dict().items():
        assert torch.equal(v, best.ladder.state_dict()[k]), k
    assert not list(tmp_path.rglob("*.lock"))


def test_sighup_mid_predict_keeps_the_samples_and_sigterm_ends_levels(inputs, tmp_path):
    pred = tmp_path / "pred"
    proc = _popen("predict", str(inputs / "run" / "m.hdn"), str(inputs / "noisy.tif"), "--out-dir",
                  str(pred), "--samples", "100000")
    try:
        proc.stderr.read(1)  # the progress bar has started
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "SIGHUP received" in err and "stopped: wrote mmse.tif" in err, err
    assert np.isfinite(tifffile.imread(pred / "mmse.tif")).all()
    # a command with nothing to keep ends as after Ctrl-C: one line, 130 (not 143 in silence)
    proc = _popen("levels", str(inputs / "run" / "m.hdn"), str(inputs / "noisy.tif"), "--samples",
                  "100000", "--crop", "32")
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "napari-hdn: interrupted" in err, err


def test_stop_signals_in_process():
    """SIGTERM and SIGHUP set the stop flag like the first Ctrl-C; the same one repeated at once
    (a scheduler and a launcher both passing it on) is one request; Ctrl-C again aborts."""
    from napari_hdn.cli._common import SigintStop
    from napari_hdn.cli._signals import interrupt_on_signals

    for first in (signal.SIGTERM, signal.SIGHUP):
        flag, seen = StopFlag(), []
        with SigintStop(flag, "stopping", on_signal=seen.append):
            os.kill(os.getpid(), first)
            time.sleep(0.05)
            assert flag.is_set() and seen == [first]
            os.kill(os.getpid(), first)  # delivered twice: not an abort
            time.sleep(0.05)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert signal.getsignal(first) in (signal.SIG_DFL, signal.SIG_IGN) or callable(
            signal.getsignal(first))
    with pytest.raises(KeyboardInterrupt), interrupt_on_signals():  # elsewhere in a command
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)


# -- resume ----------------------------------------------------------------------------------------
def test_resume_on_other_data_warns_naming_both(inputs, tmp_path, capsys):
    ck = inputs / "run" / "m.checkpoints" / "last.hdn"
    rc = main(["train", str(inputs / "other.tif"), "--resume", str(ck), "--max-steps", "5",
               "--out", str(tmp_path / "a.hdn"), *RESUME_ARGS])
    err = capsys.readouterr().err
    warn = [ln for ln in err.splitlines() if "other data than it was trained on" in ln]
    assert rc == 0 and len(warn) == 1, err
    assert "then 2 frames of 64x64 float32, mean 4" in warn[0] and "now 2 frames" in warn[0]
    rc = main(["train", str(inputs / "noisy.tif"), "--resume", str(ck), "--max-steps", "5",
               "--out", str(tmp_path / "b.hdn"), *RESUME_ARGS])
    cap = capsys.readouterr()
    assert rc == 0 and "other data" not in cap.err and "resumed from" in cap.out


def test_resume_checks_in_the_api(inputs, tmp_path):
    rng = np.random.default_rng(3)
    img = smooth_image((64, 64), 1) + rng.normal(0, 10, (64, 64))
    kw = dict(**TINY, patch_size=32, batch_size=8, device="cpu", steps_per_epoch=2, seed=0)
    train(img, GaussianNoiseModel(10.0), max_steps=2, checkpoint_dir=tmp_path, **kw)
    ck = tmp_path / "last.hdn"
    assert checkpoint_state(ck)["step"] == 2
    with pytest.raises(InputError, match=r"max_steps=2 would train nothing: give max_steps above 2"):
        train(img, resume=ck, max_steps=2)
    with pytest.raises(InputError, match="the end of its run"):
        train(img, resume=ck)
    with pytest.raises(InputError, match="time_budget_s="):
        train(img, resume=ck, max_steps=10, time_budget_s=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HDNWarning)  # the same data: no warning
        m = train(img, resume=ck, max_steps=3)
    assert m.info["training_data"]["frames"] == 1
    with pytest.warns(HDNWarning, match="other pixel values"):  # same size, other pixels
        train(img[::-1].copy(), resume=ck, max_steps=3)
    check_steps_left({}, None, ck)  # a plain model file: nothing to check


def test_best_checkpoint_is_the_model_a_stop_returns(tmp_path):
    """With a weight average (ema_decay), best.hdn holds the averaged weights that were validated
    and returned, not the live ones."""
    rng = np.random.default_rng(4)
    img = smooth_image((64, 64), 2) + rng.normal(0, 10, (64, 64))
    m = train(img, GaussianNoiseModel(10.0), **TINY, patch_size=32, batch_size=8, device="cpu",
              steps_per_epoch=2, max_steps=4, ema_decay=0.9, seed=0, checkpoint_dir=tmp_path)
    best = load_model(tmp_path / "best.hdn")
    for k, v in m.ladder.state_dict().items():
        assert torch.equal(v, best.ladder.state_dict()[k]), k


# -- noise models ----------------------------------------------------------------------------------
def test_check_noise_model_passes_good_models_and_names_what_is_wrong(inputs):
    from napari_hdn.engine.noise import pairs_from_calibration

    pairs = pairs_from_calibration(tifffile.imread(inputs / "cal.tif"))
    good = [GaussianNoiseModel(10.0), PoissonGaussianNoiseModel(2.0, 3.0, 100.0),
            fit_noise_model(pairs, kind="histogram", device="cpu"),
            fit_noise_model(pairs, kind="gmm", device="cpu", iterations=20)]
    for m in good:
        assert noise_model_problem(m, (-100.0, 2000.0)) == "", m
    tiny = GaussianNoiseModel(1e-20)  # fine for itself, but any residual of the data overflows
    assert "log-likelihood is -inf" in noise_model_problem(tiny, (0.0, 200.0))
    nan = GaussianNoiseModel(1.0)
    nan.sigma = float("nan")  # edited after it was made
    with pytest.raises(InputError, match="its parameter sigma is nan"):
        check_noise_model(nan)
    with pytest.raises(InputError, match="the noise model is broken"):
        train(np.random.default_rng(0).normal(50, 10, (64, 64)), GaussianNoiseModel(1e-200),
              **TINY, patch_size=32, max_steps=100000, device="cpu")


# -- the Training widget's Stop --------------------------------------------------------------------
@pytest.mark.usefixtures("widget_session")
def test_widget_stop_keeps_the_best_model_like_ctrl_c(viewer, qtbot, notes):
    from _widget_helpers import WAIT, dock, set_tiny

    from napari_hdn.widgets import get_session
    from napari_hdn.widgets._base import TaskState

    rng = np.random.default_rng(1)
    viewer.add_image((100 + 5 * rng.normal(size=(64, 64))).astype(np.float32), name="img")
    get_session().add_noise_model(GaussianNoiseModel(5.0), "g5")
    tw = dock(viewer, "Training")
    set_tiny(tw, steps=100000)
    assert tw.start_training()
    qtbot.waitUntil(lambda: len(tw.plot.val) >= 1, timeout=WAIT)
    tw.stop_btn.click()
    qtbot.waitUntil(lambda: not tw.task.running, timeout=WAIT)
    assert tw.state == TaskState.STOPPED
    entry = tw.model_combo.current_entry()
    assert entry.model.info["stopped_early"] is True
    best = load_model(entry.checkpoint.parent / "best.hdn")  # the best so far, as a file too
    for k, v in entry.model.ladder.state_dict().items():
        assert torch.equal(v.cpu(), best.ladder.state_dict()[k]), k


# -- prediction stores: inputs never touched, one input per store, one writer ------------------------
@pytest.fixture
def stores(inputs, tmp_path):
    """A zarr input, an earlier result store, a store with unwritten chunks, an OME-Zarr image
    whose named dataset is missing, and a prediction store of another input."""
    zarr = pytest.importorskip("zarr")
    img = tifffile.imread(inputs / "noisy.tif")
    g = zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    g.create_array("raw", shape=img.shape, chunks=(1, 32, 32), dtype="float32",
                   dimension_names=["t", "y", "x"])[:] = img
    holes = zarr.open_array(str(tmp_path / "holes.zarr"), mode="w", shape=img.shape,
                            chunks=(1, 32, 32), dtype="float32", dimension_names=["t", "y", "x"])
    holes[0] = img[0]  # the second frame's chunks were never written
    ome = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    ome.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in "tyx"],
                                 "datasets": [{"path": "0"}]}]
    ome.create_array("1", shape=img.shape, chunks=(1, 32, 32), dtype="float32")[:] = img
    model = str(inputs / "run" / "m.hdn")
    assert main(["predict", model, str(tmp_path / "x.zarr/raw"), "--out",
                 str(tmp_path / "r.zarr"), "--samples", "2", "--quiet"]) == 0
    return tmp_path, model


STORE_ROWS = [
    # (argv after `predict MODEL`, words of the one-line error)
    (["{d}/r.zarr/mmse", "--out", "{d}/r.zarr", "--overwrite"], "holds the input"),
    (["{d}/r.zarr/mmse", "--out", "{d}/r.zarr"], "holds the input"),
    (["{d}/x.zarr/raw", "--out", "{d}/x.zarr/../x.zarr", "--overwrite"], "holds the input"),
    (["{d}/x.zarr", "--out", "{d}/x.zarr", "--overwrite"], "is the input"),
    (["{d}/r.zarr/mmse", "--out", "{d}/r.zarr/sub.zarr"], "inside the zarr store"),
    (["{d}/ome.zarr", "--out", "{d}/o.zarr"], "does not hold (it holds 1)"),
    (["{d}/holes.zarr", "--out", "{d}/r.zarr", "--samples", "2"], "made of another input"),
    (["{d}/x.zarr/raw", "--out", "{d}/r.zarr", "--samples", "3"], "samples differ"),
]


@pytest.mark.parametrize("argv,words", STORE_ROWS, ids=[f"store-{k}" for k in range(len(STORE_ROWS))])
def test_a_prediction_store_never_touches_its_input_nor_mixes_inputs(stores, capsys, argv, words):
    d, model = stores
    before = _hashes(d)
    rc = main(["predict", model, *[a.replace("{d}", str(d)) for a in argv], "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("napari-hdn: error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert _hashes(d) == before, "a file changed"
    assert not list(d.rglob("*.lock"))


def test_missing_chunks_of_a_zarr_input_are_warned_about(stores, capsys):
    d, model = stores
    assert main(["predict", model, str(d / "holes.zarr"), "--out", str(d / "h.zarr"), "--samples",
                 "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "4 of its 8 chunks (50%) are not stored" in err and "fill value 0" in err
    # a store written in full says nothing
    assert main(["predict", model, str(d / "x.zarr/raw"), "--out", str(d / "x2.zarr"),
                 "--samples", "2", "--quiet"]) == 0
    assert "not stored" not in capsys.readouterr().err


def test_a_prediction_store_or_folder_being_written_is_refused_naming_the_writer(stores, capsys):
    d, model = stores
    pid = str(os.getpid())
    for out, argv in [(d / "p.zarr", ["--out", str(d / "p.zarr")]),
                      (d / "tiffs", ["--out-dir", str(d / "tiffs")])]:
        with output_lock(out):
            rc = main(["predict", model, str(inputs_tif(d)), *argv, "--samples", "2", "--quiet",
                       "--axes", "TYX"])
            err = capsys.readouterr().err
        assert rc == 1 and f"is being written by process {pid}" in err, err
        assert not out.exists()
    # free again: both go ahead and give their locks back
    assert main(["predict", model, str(inputs_tif(d)), "--out-dir", str(d / "tiffs"), "--samples",
                 "2", "--quiet", "--axes", "TYX"]) == 0
    assert (d / "tiffs" / "mmse.tif").exists() and not list(d.rglob("*.lock"))


def inputs_tif(d: Path) -> Path:
    """A TIFF of the zarr input (the predict commands above read TIFFs and stores alike)."""
    p = d / "x.tif"
    if not p.exists():
        import zarr

        tifffile.imwrite(p, np.asarray(zarr.open_array(str(d / "x.zarr/raw"), mode="r")[:]))
    return p


def test_kept_samples_that_cannot_fit_are_refused_naming_the_option(inputs, tmp_path, capsys,
                                                                    monkeypatch):
    from napari_hdn.engine import device as device_module

    monkeypatch.setattr(device_module, "available_memory", lambda: 10 * 4 * 64 * 64 * 2)
    rc = main(["predict", str(inputs / "run" / "m.hdn"), str(inputs / "noisy.tif"), "--out-dir",
               str(tmp_path / "o"), "--samples", "100", "--save-samples", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "--samples 8 or fewer" in err, err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_the_api_refuses_a_store_that_holds_its_zarr_array_input(stores):
    import zarr

    from napari_hdn.engine import OutputError
    from napari_hdn.engine.prediction.chunked import predict_to_zarr

    d, model = stores
    arr = zarr.open_group(str(d / "r.zarr"), mode="r")["mmse"]
    before = _hashes(d)
    with pytest.raises(OutputError, match="holds the input"):
        predict_to_zarr(model, arr, d / "r.zarr", n_samples=2, axes="TYX", overwrite=True)
    assert _hashes(d) == before and not list(d.rglob("*.lock"))


# -- round two of the probes: outputs that are links, special files or hold inputs -----------------
def test_a_lock_file_that_is_a_link_is_never_written_through(inputs, tmp_path, capsys):
    victim = tmp_path / "victim.tif"
    victim.write_bytes((inputs / "noisy.tif").read_bytes())
    before = victim.read_bytes()
    (tmp_path / "K.hdn.lock").symlink_to(victim)
    rc = main(_train_argv(inputs, tmp_path / "K.hdn"))
    err = capsys.readouterr().err
    assert rc == 1 and "is a symbolic link" in err and "Traceback" not in err, err
    assert victim.read_bytes() == before and (tmp_path / "K.hdn.lock").is_symlink()
    assert not (tmp_path / "K.hdn").exists()


def test_special_files_are_never_replaced_by_an_output(inputs, tmp_path, capsys):
    fifo = tmp_path / "fifo.hdn"
    os.mkfifo(fifo)
    for argv in (_train_argv(inputs, fifo, "--overwrite"),
                 ["noise-model", "fit", "--calibration", str(inputs / "cal.tif"), "--out",
                  str(tmp_path / "n.hdnoise"), "--figure", str(fifo), "--overwrite", "--quiet",
                  "--kind", "histogram", "--device", "cpu"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 1 and "is a FIFO (named pipe), not a file" in err, err
        assert fifo.is_fifo()
    assert not list(tmp_path.glob("*.checkpoints")) and not (tmp_path / "n.hdnoise").exists()


def test_an_input_where_training_writes_a_checkpoint_is_refused_even_with_overwrite(
        inputs, tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "best.hdn").write_bytes((inputs / "run" / "m.hdn").read_bytes())
    (ck / "data.tif").write_bytes((inputs / "noisy.tif").read_bytes())
    before = _hashes(ck)
    for argv in (["--init", str(ck / "best.hdn")], ["--noise-model", str(ck / "best.hdn")]):
        rc = main(["train", str(ck / "data.tif"), "--out", str(tmp_path / "m.hdn"),
                   "--checkpoint-dir", str(ck), "--overwrite", "--max-steps", "1", *TINY_ARGS,
                   *argv])
        err = capsys.readouterr().err
        assert rc == 1 and "is where training writes its checkpoint best.hdn" in err, err
    assert _hashes(ck) == before and not (tmp_path / "m.hdn").exists()
    # an earlier run's checkpoints without last.hdn: no advice to resume from a missing file
    rc = main(["train", str(inputs / "noisy.tif"), "--gaussian-sigma", "10", "--out",
               str(tmp_path / "m.hdn"), "--checkpoint-dir", str(ck), *TINY_ARGS])
    err = capsys.readouterr().err
    assert rc == 1 and "holds checkpoints of an earlier run" in err and "--resume" not in err


def test_two_spellings_of_one_output_share_one_lock(inputs, tmp_path, capsys):
    real = tmp_path / "A"
    real.mkdir()
    (tmp_path / "Alink").symlink_to(real)
    with output_lock(real):
        rc = main(["predict", str(inputs / "run" / "m.hdn"), str(inputs / "noisy.tif"),
                   "--out-dir", str(tmp_path / "Alink"), "--samples", "2", "--quiet",
                   "--overwrite"])
        err = capsys.readouterr().err
    assert rc == 1 and f"is being written by process {os.getpid()}" in err, err
    assert not list(real.iterdir())


def test_bench_checks_its_json_file_before_the_run(tmp_path, capsys):
    target = tmp_path / "keep.hdn"
    target.write_bytes(b"precious")
    t0 = time.perf_counter()
    rc = main(["bench", "--quick", "--json", str(target)])
    err = capsys.readouterr().err
    assert rc == 1 and "exists: add --overwrite" in err and time.perf_counter() - t0 < 10, err
    assert target.read_bytes() == b"precious"


PROBE_ROWS_2 = [  # (argv after `predict MODEL`, words of the one-line error)
    (["{in}/noisy.tif", "--out-dir", "{out}/o", "--channel", "-1"], "picks the channel of a chunked"),
]


@pytest.mark.parametrize("argv,words", PROBE_ROWS_2)
def test_probe_round_two_cli(inputs, tmp_path, capsys, argv, words):
    rc = main(["predict", str(inputs / "run" / "m.hdn"),
               *[a.replace("{in}", str(inputs)).replace("{out}", str(tmp_path)) for a in argv]])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and words in err, err


def test_probe_round_two_api(tmp_path):
    zarr = pytest.importorskip("zarr")
    from napari_hdn.engine import ModelFileError, load_model
    from napari_hdn.engine.data.lazy import open_array
    from napari_hdn.engine.noise import GMMNoiseModel

    with pytest.raises(ModelFileError, match="path of a model file, not int"):
        load_model(3)
    with pytest.raises(InputError, match="signal_range"):
        GMMNoiseModel((5.0, 1.0), 2, 1, 1.0, 10.0)
    zarr.open_array(str(tmp_path / "empty.zarr"), mode="w", shape=(0, 64, 64), dtype="float32")
    with pytest.raises(InputError, match="holds no image"):
        open_array(tmp_path / "empty.zarr")
    g = zarr.open_group(str(tmp_path / "dots.zarr"), mode="w")
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in "yx"],
                               "datasets": [{"path": "../elsewhere/0"}]}]
    g.create_array("1", shape=(64, 64), dtype="float32")
    with pytest.raises(InputError, match="does not hold"):
        open_array(tmp_path / "dots.zarr")
    with pytest.raises(InputError, match="empty"):
        __import__("napari_hdn").predict(_tiny(), np.zeros((0, 64), np.float32), 2)


def _tiny():
    from napari_hdn.engine import HDNModel, ModelConfig, Normalisation

    return HDNModel(ModelConfig(**TINY), GaussianNoiseModel(10.0), Normalisation(50.0, 30.0))


def test_a_damaged_chunk_of_a_zarr_input_is_named(inputs, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    img = tifffile.imread(inputs / "noisy.tif")
    z = zarr.open_array(str(tmp_path / "bad.zarr"), mode="w", shape=img.shape, chunks=(1, 32, 32),
                        dtype="float32")
    z[:] = img
    chunk = next(p for p in (tmp_path / "bad.zarr").rglob("*") if p.is_file()
                 and p.name != "zarr.json" and p.parts[-4:-3] != ("0",))
    chunk.write_bytes(b"garbage")
    rc = main(["predict", str(inputs / "run" / "m.hdn"), str(tmp_path / "bad.zarr"), "--out",
               str(tmp_path / "o.zarr"), "--samples", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "cannot be read at chunk" in err, err


def test_a_bad_chunk_says_what_the_store_keeps(inputs, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    img = tifffile.imread(inputs / "noisy.tif").copy()
    img[1, 5, 5] = np.nan
    zarr.open_array(str(tmp_path / "nan.zarr"), mode="w", shape=img.shape, chunks=(1, 64, 64),
                    dtype="float32")[:] = img
    rc = main(["predict", str(inputs / "run" / "m.hdn"), str(tmp_path / "nan.zarr"), "--out",
               str(tmp_path / "o.zarr"), "--samples", "2", "--quiet", "--tile-size", "64"])
    err = capsys.readouterr().err
    assert rc == 1 and "NaN" in err and "chunks of 2 finished are kept" in err, err


def test_an_image_narrower_than_any_patch_names_the_smallest_size():
    with pytest.raises(InputError, match="at least 8 pixels on each side"):
        train(np.ones((64, 1), np.float32), GaussianNoiseModel(1.0), patch_size=8, max_steps=1,
              device="cpu", levels=1, z_dim=2, filters=8, blocks=1)


def test_options_are_named_as_the_caller_wrote_them(inputs, tmp_path, capsys):
    from napari_hdn.engine.noise import fit_noise_model
    from napari_hdn.engine.prediction.chunked import predict_to_zarr

    with pytest.raises(InputError, match="workers= must be at least 1"):
        predict_to_zarr(str(inputs / "run" / "m.hdn"), np.ones((64, 64), np.float32),
                        tmp_path / "o.zarr", n_samples=1, workers=0)
    with pytest.raises(InputError, match="margin= must be at least 0"):
        predict_to_zarr(str(inputs / "run" / "m.hdn"), np.ones((64, 64), np.float32),
                        tmp_path / "o.zarr", n_samples=1, margin=-1)
    rng = np.random.default_rng(0)
    s = rng.uniform(10, 100, 20000)
    with pytest.raises(InputError, match="lr must be a positive number of at most"):
        fit_noise_model(s, s + rng.normal(0, 3, s.shape), method="minibatch", lr=1e200)
    rc = main(["predict", str(inputs / "run" / "m.hdn"), str(inputs / "noisy.tif"), "--out",
               str(tmp_path / "p.zarr"), "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "--workers must be at least 1" in err, err


def test_edited_checkpoint_counters_and_a_store_with_a_file_name_are_refused(inputs, tmp_path):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_hdn.engine import ModelFileError, OutputError
    from napari_hdn.engine.prediction.chunked import predict_to_zarr

    src = inputs / "run" / "m.checkpoints" / "last.hdn"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for bad in (-5, 10**30, 2.5):
        ck = _json.loads(meta["checkpoint"])
        ck["step"] = bad
        edited = tmp_path / f"edited-{k if (k := str(bad).replace('.', '_')) else 'x'}.hdn"
        save_file(tensors, str(edited), metadata={**meta, "checkpoint": _json.dumps(ck)})
        with pytest.raises(ModelFileError, match="checkpoint's step is .* which no run can have"):
            train(tifffile.imread(inputs / "noisy.tif"), resume=edited, max_steps=100,
                  device="cpu", axes="TYX")
    with pytest.raises(OutputError, match="give a name ending in .zarr"):
        predict_to_zarr(str(inputs / "run" / "m.hdn"), np.ones((64, 64), np.float32),
                        tmp_path / "x.tif", n_samples=1)
    assert not (tmp_path / "x.tif").exists()


def test_resuming_a_finished_model_file_says_so_and_keeps_its_settings(inputs, tmp_path, capsys):
    rc = main(["train", str(inputs / "noisy.tif"), "--resume", str(inputs / "run" / "m.hdn"),
               "--max-steps", "6", "--out", str(tmp_path / "r.hdn"), *RESUME_ARGS])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "holds no checkpoint state" in err and "last.hdn" in err
    model = load_model(tmp_path / "r.hdn")
    assert model.info["training_config"]["patch_size"] == 32  # the model's own, not the preset's
