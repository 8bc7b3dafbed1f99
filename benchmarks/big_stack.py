"""Peak memory of training from a large time-lapse: ``python -m benchmarks.big_stack``.

Writes (once, seeded) a uint16 BigTIFF time-lapse of ``--frames`` x 512 x 512 (4000 frames: 2.1
GB) with ImageJ metadata (TYX, 0.2 µm pixels), then runs ``napari-hdn train`` on it for
``--steps`` steps in a child process per tree and prints the child's peak resident memory
(``ru_maxrss``) and wall time. ``--old PATH`` adds a checkout of another commit (its ``src`` on
``PYTHONPATH``), run one after the other on the same file; ``--old-frames`` gives it a shorter
file (the old code read the whole file and copied it several times over: 22 GB for 2.1 GB).

``--widget`` also trains from the Training widget in a napari viewer (under Xvfb), the stack
opened as a dask layer (what a lazy TIFF or OME-Zarr reader gives napari), and prints the viewer
process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIDE = 512


def make_stack(path: Path, frames: int, seed: int = 0) -> None:
    """A drifting field of blobs with Poisson-Gaussian noise (gain 2, read noise 5, offset 100)."""
    import tifffile
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    base = ndi.gaussian_filter(rng.random((SIDE + 64, SIDE + 64)), 6)
    base = (base - base.min()) / (base.max() - base.min())

    def frame(t):
        dy, dx = int(32 + 20 * np.sin(t / 150)), int(32 + 20 * np.cos(t / 170))
        clean = 100 + 2 * 400 * base[dy:dy + SIDE, dx:dx + SIDE]
        noisy = rng.poisson((clean - 100) / 2) * 2 + 100 + rng.normal(0, 5, clean.shape)
        return np.clip(noisy, 0, 65535).astype(np.uint16)

    tmp = path.with_suffix(".part.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True, imagej=True) as tif:
        tif.write((frame(t) for t in range(frames)), shape=(frames, SIDE, SIDE), dtype=np.uint16,
                  resolution=(5.0, 5.0), metadata={"axes": "TYX", "unit": "um"})
    tmp.replace(path)


def run(tree: Path, stack: Path, out: Path, steps: int) -> dict:
    """``napari-hdn train`` from ``tree`` in a child process: peak RSS, wall time, exit code."""
    code = (
        "import resource, sys, time\n"
        "from napari_hdn.cli import main\n"
        "t = time.perf_counter()\n"
        "rc = main(sys.argv[1:])\n"
        "print('RESULT', rc, time.perf_counter() - t,"
        " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")
    argv = [sys.executable, "-c", code, "train", str(stack), "--poisson-gain", "2",
            "--read-noise", "5", "--offset", "100", "--out", str(out), "--max-steps", str(steps),
            "--overwrite", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {"rc": proc.returncode, "wall_s": wall, "peak_mb": peak / 1024,
                "error": proc.stderr.strip().splitlines()[-1:]}
    _, rc, _, peak = line.split()
    return {"rc": int(rc), "wall_s": round(wall, 1), "peak_mb": round(int(peak) / 1024)}


WIDGET_CODE = """
import resource, sys, time
import dask.array as da
import napari
from qtpy.QtWidgets import QApplication
from napari_hdn.engine import PoissonGaussianNoiseModel
from napari_hdn.engine.data.frames import TiffPages
from napari_hdn.session import get_session
path, steps = sys.argv[1], int(sys.argv[2])
pages = TiffPages(path)  # a lazy layer: what a lazy TIFF or OME-Zarr reader gives napari
viewer = napari.Viewer(show=False)
viewer.add_image(da.from_array(pages, chunks=(1, pages.shape[1], pages.shape[2])), name="timelapse")
get_session().add_noise_model(PoissonGaussianNoiseModel(2.0, 5.0, 100.0), "camera")
_, w = viewer.window.add_plugin_dock_widget("napari-hdn", "Training")
w.layer_combo.set_layer("timelapse")
w.noise_combo.setCurrentText("camera")
w.steps.setValue(steps)
t = time.perf_counter()
assert w.start_training()
app = QApplication.instance()
while w.task.running:
    app.processEvents()
    time.sleep(0.02)
print("RESULT", w.state.value, time.perf_counter() - t,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
viewer.close()
"""


def run_widget(stack: Path, steps: int) -> dict:
    """The Training widget on the stack as a dask layer, in napari under Xvfb: peak RSS."""
    proc = subprocess.run(["xvfb-run", "-a", sys.executable, "-c", WIDGET_CODE, str(stack),
                           str(steps)], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        return {"error": proc.stderr.strip().splitlines()[-3:]}
    _, state, wall, peak = line.split()
    return {"state": state, "wall_s": round(float(wall), 1), "peak_mb": round(int(peak) / 1024)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=4000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the stack is written")
    p.add_argument("--old", help="a checkout of another commit to run beside this tree")
    p.add_argument("--old-frames", type=int, help="frames of the old tree's stack (default: same)")
    p.add_argument("--widget", action="store_true",
                   help="also train from the Training widget (this tree), the stack as a dask layer")
    a = p.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    d = Path(a.dir)
    rows = []
    trees = [("new", here, a.frames)]
    if a.old:
        trees.append(("old", Path(a.old), a.old_frames or a.frames))
    for name, tree, frames in trees:
        stack = d / f"timelapse-{frames}x{SIDE}x{SIDE}.tif"
        if not stack.exists():
            t = time.perf_counter()
            make_stack(stack, frames)
            print(f"wrote {stack} ({stack.stat().st_size / 2**30:.2f} GiB) in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        res = run(tree, stack, d / f"big-{name}.hdn", a.steps)
        res.update(tree=name, frames=frames, file_gib=round(stack.stat().st_size / 2**30, 2))
        print(json.dumps(res), flush=True)
        rows.append(res)
    if a.widget:
        stack = d / f"timelapse-{a.frames}x{SIDE}x{SIDE}.tif"
        res = run_widget(stack, a.steps)
        res.update(tree="new, Training widget (dask layer)", frames=a.frames,
                   file_gib=round(stack.stat().st_size / 2**30, 2))
        print(json.dumps(res), flush=True)
        rows.append(res)
    print("| tree | frames | file (GiB) | steps | peak RSS (MiB) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tree']} | {r['frames']} | {r['file_gib']} | {a.steps} | {r['peak_mb']} | "
              f"{r['wall_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
