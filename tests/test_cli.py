import json
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
    rc = main(["predict", str(model), str(noisy_tif), "--out-dir", str(tmp_path / "tta"),
               "--samples", "2", "--tta", "--sampling", "stratified", "--quiet"])
    assert rc == 0 and tifffile.imread(tmp_path / "tta" / "mmse.tif").shape == (2, 64, 64)
    meta = json.loads(tifffile.TiffFile(tmp_path / "tta" / "mmse.tif").pages[0].description)
    assert meta["tta"] is True and meta["sampling"] == "stratified"
    rc = main(["predict", str(model), str(noisy_tif), "--out-dir", str(tmp_path / "tta2"),
               "--samples", "2", "--tta", "--save-samples", "--quiet"])
    assert rc == 1 and "--tta" in capsys.readouterr().err
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


# -- presets, the package's structure, Ctrl-C ------------------------------------------------------


def _train_args(*extra):
    from napari_hdn.cli import build_parser

    return build_parser().parse_args(["train", "x.tif", "--out", "m.hdn", *extra])


@pytest.fixture
def patched_default_preset(monkeypatch):
    """The default preset with other values, as a change of engine/presets.py would make them."""
    from napari_hdn.engine.training import presets

    name = presets.DEFAULT_PRESET
    changed = presets.Preset(name, "changed", model=dict(levels=2, z_dim=2, filters=8, blocks=1,
                                                           dropout=0.0),
                             training=dict(patch_size=32, batch_size=4, lr=0.00123, max_steps=3,
                                           lr_patience=7))
    monkeypatch.setitem(presets.PRESETS, name, changed)
    return changed


def test_train_takes_the_preset_and_single_options_override_it(patched_default_preset):
    from napari_hdn.cli.train import configs_from_args
    from napari_hdn.engine.training.presets import PRESETS

    mcfg, tcfg, over = configs_from_args(_train_args())
    assert mcfg.levels == 2 and mcfg.filters == 8  # the (changed) default preset, not a copy of it
    assert tcfg.lr == 0.00123 and tcfg.lr_patience == 7 and tcfg.max_steps == 3 and over == {}
    mcfg, tcfg, _ = configs_from_args(_train_args("--lr", "0.01", "--levels", "3"))
    assert tcfg.lr == 0.01 and tcfg.lr_patience == 7 and mcfg.levels == 3 and mcfg.filters == 8
    mcfg, tcfg, _ = configs_from_args(_train_args("--preset", "paper", "--max-steps", "9"))
    assert mcfg.filters == PRESETS["paper"].model["filters"] and tcfg.max_steps == 9
    assert tcfg.lr == PRESETS["paper"].training["lr"]
    _, tcfg, _ = configs_from_args(_train_args("--minutes", "1.5", "--threads", "1"))
    assert tcfg.time_budget_s == 90.0 and tcfg.threads == 1
    # resuming keeps the checkpoint's settings unless a preset is named; options still apply
    assert configs_from_args(_train_args("--resume", "c.hdn", "--max-steps", "9")) == \
        (None, None, {"max_steps": 9})
    from napari_hdn.cli import CLIError

    with pytest.raises(CLIError, match="architecture options"):
        configs_from_args(_train_args("--resume", "c.hdn", "--levels", "3"))
    with pytest.raises(SystemExit):
        _train_args("--preset", "huge")


def test_demo_trains_the_default_preset_and_its_bar_counts_time(tmp_path, patched_default_preset,
                                                                 capsys):
    from napari_hdn.cli._common import Progress
    from napari_hdn.demo import run_demo
    from napari_hdn.engine import ProgressEvent, load_model

    events = []
    figures = run_demo(tmp_path, minutes=0.02, n_samples=2, device="cpu", quiet=True,
                       callbacks=events.append)
    model = load_model(tmp_path / "demo.hdn")
    assert model.config.levels == 2 and model.config.filters == 8
    tc = model.info["training_config"]
    assert tc["lr"] == 0.00123 and tc["lr_patience"] == 7 and tc["batch_size"] == 4
    assert tc["max_steps"] > 1000  # the clock stops it, not the preset's 3 steps
    assert tc["time_budget_s"] == pytest.approx(0.02 * 60)
    assert figures["preset"] == patched_default_preset.name
    assert {"train", "predict"} <= {e.task for e in events}
    assert (tmp_path / "mmse.tif").exists() and "PSNR MMSE" in capsys.readouterr().out

    # a time-budgeted bar counts seconds: its total is the budget, whatever max_steps is
    bar = Progress(time_budget={"train": 180.0})
    bar(ProgressEvent("train", "start", step=0, total=1_000_000, elapsed=0.0))
    bar(ProgressEvent("train", "step", step=40, total=1_000_000, elapsed=45.0,
                      metrics={"train_loss": 1.5}))
    b = bar.bars["train"]
    assert b.total == 180.0 and b.n == 45.0 and b.unit == "s"
    bar.close()
    # a run with a time budget is drawn in seconds of training without being told
    bar = Progress()
    bar(ProgressEvent("train", "start", step=0, total=2000, elapsed=0.0,
                      metrics={"time_budget_s": 60.0}))
    bar(ProgressEvent("train", "step", step=9, total=2000, elapsed=20.0,
                      metrics={"train_seconds": 15.0, "time_budget_s": 60.0}))
    b = bar.bars["train"]
    assert b.total == 60.0 and b.n == 15.0 and b.unit == "s"
    bar.close()


def test_cli_is_a_package_without_cycles_or_private_calls():
    import ast
    import pathlib

    import napari_hdn.cli as cli

    root = pathlib.Path(cli.__file__).parent
    assert {p.name for p in root.glob("*.py")} >= {"__init__.py", "_common.py", "train.py",
                                                     "predict.py", "noise.py", "demo.py", "bench.py"}
    for path in [*root.glob("*.py"), root.parent / "demo.py", root.parent / "bench.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Attribute) and node.attr == "_finish"), path
            if isinstance(node, ast.Try):  # no import hidden behind except ImportError
                for h in node.handlers:
                    assert "ImportError" not in ast.unparse(h.type or ast.Name("x")), path
    # (that the demo and the benchmark import nothing of the CLI: tests/test_reader_imports.py)


def test_ctrl_c_stops_training_and_saves_the_best_model(tmp_path, noisy_tif):
    import signal
    import time

    model = tmp_path / "m.hdn"
    proc = subprocess.Popen([sys.executable, "-m", "napari_hdn.cli", "train", str(noisy_tif),
                             "--gaussian-sigma", "10", "--out", str(model), "--max-steps", "100000",
                             "--steps-per-epoch", "2", "--axes", "TYX", *TINY_ARGS],
                            stderr=subprocess.PIPE, text=True)
    ck = tmp_path / "m.checkpoints" / "last.hdn"
    t_end = time.time() + 120
    while not ck.exists() and time.time() < t_end and proc.poll() is None:
        time.sleep(0.2)
    assert ck.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped at step" in err and "Traceback" not in err
    from napari_hdn.engine import load_model

    m = load_model(model)
    assert m.info["stopped_early"] is True and 0 < m.info["steps"] < 100000
    assert m.info["axes"] == "TYX"


def test_levels_suggest_and_fine_tune(tmp_path, noisy_tif, capsys):
    """`levels` describes each level and prints the commands; `predict --suggest-levels` uses the
    suggestion; `train --fine-tune` trains a model on with levels withheld."""
    import json

    from napari_hdn.engine import load_model

    model = tmp_path / "m.hdn"
    assert main(["train", str(noisy_tif), "--gaussian-sigma", "10", "--out", str(model),
                 "--max-steps", "2", "--axes", "TYX", *TINY_ARGS]) == 0
    capsys.readouterr()
    assert main(["levels", str(model), str(noisy_tif), "--samples", "2", "--crop", "32"]) == 0
    out = capsys.readouterr().out
    assert "level 1: removes" in out and "suggested:" in out and "crop 32x32" in out
    assert main(["levels", str(model), str(noisy_tif), "--samples", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["mode"] == "prior-mean" and len(rep["suggested"]) == 2
    assert [s["level"] for s in rep["steps"]] == [1]
    rc = main(["predict", str(model), str(noisy_tif), "--out-dir", str(tmp_path / "p"),
               "--samples", "2", "--suggest-levels", "--quiet"])
    assert rc == 0 and "levels: suggested:" in capsys.readouterr().err
    rc = main(["predict", str(model), str(noisy_tif), "--out-dir", str(tmp_path / "p2"),
               "--samples", "2", "--suggest-levels", "--deactivate", "1", "--quiet"])
    assert rc == 1 and "not both" in capsys.readouterr().err
    tuned = tmp_path / "t.hdn"
    rc = main(["train", str(noisy_tif), "--fine-tune", str(model), "--deactivate", "1",
               "--max-steps", "2", "--batch-size", "4", "--out", str(tuned), "--quiet"])
    assert rc == 0 and "fine-tuned for 2 steps with levels 1 withheld" in capsys.readouterr().out
    t = load_model(tuned)
    assert t.config.deactivated_levels == [1] and t.info["fine_tuned"]["levels"] == [1]
    for extra, msg in ((["--deactivate", "1,2"], "at least one level must stay active"),
                       ([], "needs --deactivate"),
                       (["--deactivate", "1", "--gaussian-sigma", "3"], "keeps the model's"),
                       (["--deactivate", "1", "--resume", str(model)], "give one of them")):
        rc = main(["train", str(noisy_tif), "--fine-tune", str(model), "--out",
                   str(tmp_path / "x.hdn"), "--quiet", *extra])
        assert rc == 1 and msg in capsys.readouterr().err, extra


def test_predict_auto_samples_per_frame_and_a_stop_keeps_finished_frames(tmp_path, noisy_tif,
                                                                         capsys, monkeypatch):
    """The default `--samples auto`: files, the samples per frame in their description; Ctrl-C
    (SIGINT from the progress callback, after 2 of 6 frames) writes the finished frames only."""
    import signal

    from napari_hdn.cli import _common, predict
    from napari_hdn.engine.data.imageio import hdn_description

    model = tmp_path / "m.hdn"
    assert main(["train", str(noisy_tif), "--gaussian-sigma", "10", "--out", str(model),
                 "--max-steps", "2", "--axes", "TYX", *TINY_ARGS]) == 0
    capsys.readouterr()
    out = tmp_path / "auto"
    assert main(["predict", str(model), str(noisy_tif), "--out-dir", str(out), "--quiet",
                 "--save-samples"]) == 0
    said = capsys.readouterr().out
    assert "samples per frame" in said
    desc = hdn_description(out / "mmse.tif")
    assert desc["n_requested"] == "auto" and len(desc["samples_per_frame"]) == 2
    assert min(desc["samples_per_frame"]) >= 8
    assert tifffile.imread(out / "samples.tif").shape == (8, 2, 64, 64)  # the floor of each

    with pytest.raises(SystemExit):
        main(["predict", str(model), str(noisy_tif), "--out-dir", str(tmp_path / "x"),
              "--samples", "many"])
    assert "whole number or 'auto'" in capsys.readouterr().err

    six = tmp_path / "six.tif"
    tifffile.imwrite(six, np.concatenate([tifffile.imread(noisy_tif)] * 3))

    class InterruptAfterTwo(_common.Progress):
        def __call__(self, ev):
            super().__call__(ev)
            if ev.task == "predict" and ev.kind == "step" and ev.step == 2:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(predict, "Progress", InterruptAfterTwo)
    stopped = tmp_path / "stopped"
    rc = main(["predict", str(model), str(six), "--out-dir", str(stopped), "--axes", "TYX",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "the 2 finished frames of 6" in err
    assert tifffile.imread(stopped / "mmse.tif").shape == (2, 64, 64)
    assert hdn_description(stopped / "variance.tif")["frames_done"] == 2
    assert not list(stopped.glob("*.tmp*"))  # nothing half-written
