"""`napari-hdn noise-model fit / describe` through the real argument parser."""

import argparse
import json

import numpy as np
import pytest
import tifffile

from napari_hdn.cli.noise import add_parser

GAIN, READ, OFFSET = 2.0, 5.0, 100.0


pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv):
    """Parse and run like `napari-hdn` does (HDNError -> exit 1, usage error -> SystemExit 2)."""
    from napari_hdn.engine.errors import HDNError

    parser = argparse.ArgumentParser(prog="napari-hdn")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HDNError as exc:
        print(f"napari-hdn: error: {exc}")
        return 1


def ramp(side):
    yy, xx = np.mgrid[0:side, 0:side]
    return OFFSET + GAIN * 500.0 * (xx / (side - 1)) * (0.6 + 0.4 * np.cos(yy / 12.0))


def camera(clean, rng, frames):
    shape = (frames, *clean.shape)
    return (rng.poisson((clean - OFFSET) / GAIN, shape) * GAIN + OFFSET
            + rng.normal(0, READ, shape)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nm")
    rng = np.random.default_rng(0)
    clean = ramp(64)
    tifffile.imwrite(d / "frames.tif", camera(clean, rng, 40))
    tifffile.imwrite(d / "clean.tif", clean.astype(np.float32))
    tifffile.imwrite(d / "noisy.tif", camera(clean, rng, 3), photometric="minisblack")
    tifffile.imwrite(d / "flat.tif", np.full((10, 32, 32), 100.0, np.float32))
    nan = camera(clean, rng, 10)
    nan[2, 3, 4] = np.nan
    tifffile.imwrite(d / "nan.tif", nan)
    return d


@pytest.fixture(scope="module")
def fitted(files):
    out = files / "cal.hdnoise"
    assert run(["noise-model", "fit", "--calibration", str(files / "frames.tif"), "--out", str(out),
                "--quiet"]) == 0
    return out


def test_fit_from_calibration_writes_model_and_figure(files, fitted, capsys):
    assert fitted.exists()
    fig = files / "cal.diagnostics.png"
    assert fig.read_bytes()[:4] == b"\x89PNG"


def test_describe_reports_std_range_and_diagnostics(fitted, capsys):
    capsys.readouterr()
    assert run(["noise-model", "describe", str(fitted), "--signal", "150,400,1000", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    levels = d["levels"]
    assert [r["signal"] for r in levels] == [150.0, 400.0, 1000.0]
    for r in levels:
        truth = np.sqrt(GAIN * (r["signal"] - OFFSET) + READ**2)
        assert abs(r["std"] / truth - 1) < 0.05
        assert abs(r["mean"] - r["signal"]) < 1e-3
    m = d["model"]
    assert m["kind"] == "gmm" and m["verdict"] == "good" and m["source"] == "calibration"
    assert m["heldout_nll"] > 0 and m["heldout_nll_histogram"] > 0
    lo, hi = m["signal_range"]
    assert lo < 110 and hi > 1000
    assert run(["noise-model", "describe", str(fitted)]) == 0
    text = capsys.readouterr().out
    assert "fitted signal range" in text and "held-out NLL" in text and "verdict: good" in text
    assert text.count("\n") > 8


def test_fit_clean_noisy_histogram_json(files, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "h.hdnoise"
    assert run(["noise-model", "fit", "--clean", str(files / "clean.tif"), "--noisy",
                str(files / "noisy.tif"), "--kind", "histogram", "--out", str(out), "--no-figure",
                "--json", "--quiet"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "histogram" and d["source"] == "clean" and d["figure"] is None
    assert not (tmp_path / "h.diagnostics.png").exists()


def test_fit_with_pseudo_clean_and_bootstrap(files, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "pseudo.tif",
                     np.broadcast_to(ramp(64), (3, 64, 64)).astype(np.float32),
                     photometric="minisblack")
    assert run(["noise-model", "fit", "--noisy", str(files / "noisy.tif"), "--pseudo-clean",
                str(tmp_path / "pseudo.tif"), "--out", str(tmp_path / "p.hdnoise"), "--quiet",
                "--gaussians", "2", "--degree", "2", "--figure", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").exists()
    out = capsys.readouterr().out
    assert "2 Gaussians, degree 2" in out
    assert run(["noise-model", "fit", "--noisy", str(files / "noisy.tif"), "--bootstrap", "n2v",
                "--n2v-steps", "5", "--save-pseudo-clean", str(tmp_path / "n2v.tif"),
                "--out", str(tmp_path / "b.hdnoise"), "--no-figure", "--quiet", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["source"] == "n2v"
    assert tifffile.imread(tmp_path / "n2v.tif").shape == (3, 64, 64)
    # a step limit that ends Noise2Void before it levels off is said in the verdict
    assert d["verdict"] == "suspicious"
    assert any("cut short by its step limit (5) after 5 steps" in r for r in d["reasons"])
    assert d["pairs_record"]["n2v"]["stop_reason"] == "max_steps"


def test_user_errors_exit_1_with_a_message(files, tmp_path, capsys):
    bad = tmp_path / "bad.hdnoise"
    bad.write_bytes(b"not a model at all")
    cases = [
        (["noise-model", "describe", str(bad)], "not a readable"),
        (["noise-model", "describe", str(tmp_path / "none.hdnoise")], "not found"),
        (["noise-model", "fit", "--calibration", str(files / "flat.tif"), "--out",
          str(tmp_path / "x.hdnoise")], "constant"),
        (["noise-model", "fit", "--calibration", str(files / "nan.tif"), "--out",
          str(tmp_path / "x.hdnoise")], "NaN"),
        (["noise-model", "fit", "--calibration", str(tmp_path / "missing.tif"), "--out",
          str(tmp_path / "x.hdnoise")], "not found"),
        (["noise-model", "fit", "--calibration", str(files / "frames.tif"), "--gaussians", "0",
          "--out", str(tmp_path / "x.hdnoise")], "--gaussians must be at least 1"),
        (["noise-model", "fit", "--calibration", str(files / "frames.tif"), "--gaussians", "17",
          "--out", str(tmp_path / "x.hdnoise")], "--gaussians must be at most 16"),
        (["noise-model", "fit", "--calibration", str(files / "frames.tif"), "--degree", "6",
          "--out", str(tmp_path / "x.hdnoise")], "--degree must be at most 5"),
        (["noise-model", "fit", "--calibration", str(files / "frames.tif"), "--val-fraction", "2",
          "--out", str(tmp_path / "x.hdnoise")], "--val-fraction must be less than 1"),
        (["noise-model", "fit", "--noisy", str(files / "noisy.tif"), "--pseudo-clean",
          str(files / "clean.tif"), "--out", str(tmp_path / "x.hdnoise")], "shape"),
    ]
    for argv, words in cases:
        capsys.readouterr()
        assert run(argv) == 1, argv
        assert words in capsys.readouterr().out, argv
    assert not (tmp_path / "x.hdnoise").exists()


@pytest.mark.parametrize("argv", [
    ["--calibration", "a.tif", "--noisy", "b.tif"],
    ["--clean", "a.tif"],
    ["--noisy", "a.tif", "--pseudo-clean", "p.tif", "--bootstrap", "n2v"],
    [],
    ["--calibration", "a.tif", "--kind", "magic"],
    ["--noisy", "a.tif", "--clip-percentiles", "1"],
])
def test_usage_errors_exit_2(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run(["noise-model", "fit", *argv, "--out", str(tmp_path / "x.hdnoise")])
    assert exc.value.code == 2


def test_help_explains_every_option():
    parser = argparse.ArgumentParser(prog="napari-hdn")
    nm = add_parser(parser.add_subparsers(dest="command"))
    subs = next(a for a in nm._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"fit", "describe"}
    for name, p in subs.choices.items():
        for action in p._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)
        text = p.format_help()
        for action in p._actions:
            for opt in action.option_strings:
                assert opt in text
    fit_help = subs.choices["fit"].format_help()
    for word in ("--calibration", "--clean", "--pseudo-clean", "--bootstrap", "--kind", "--gaussians",
                 "--degree", "--device", "--seed", "--out", "examples"):
        assert word in fit_help


def test_wired_into_the_main_cli(fitted, capsys):
    from napari_hdn.cli import main

    assert main(["noise-model", "describe", str(fitted), "--signal", "200"]) == 0
    assert "200" in capsys.readouterr().out


def test_ctrl_c_during_noise2void_still_predicts_and_fits(files, tmp_path):
    """The first Ctrl-C ends Noise2Void; the pseudo-clean image is predicted and the GMM fitted."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "c.hdnoise"
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_hdn.cli", "noise-model", "fit", "--noisy",
         str(files / "noisy.tif"), "--out", str(out), "--no-figure", "--json", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    err = ""
    deadline = time.monotonic() + 120
    while "Noise2Void training" not in err and time.monotonic() < deadline:
        err += proc.stderr.read(1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=120)
    err += rest
    assert proc.returncode == 0, err
    assert "stopping Noise2Void" in err
    d = json.loads(stdout)
    assert d["pairs_record"]["n2v"]["stop_reason"] == "stopped"
    assert d["fit"]["iterations"] >= 1 and not d["fit"]["stopped"]
    assert any("cut short by a stop request" in r for r in d["reasons"])
    assert out.exists()
