"""Make the screenshots of docs/user-guide.md and docs/artefact-removal.md with the real plugin.

It opens the built-in sample data, docks each widget, fits a noise model, trains two small models,
predicts, and switches latent levels, saving ``viewer.screenshot(canvas_only=False)`` PNGs on the
way. Headless: it runs itself under ``xvfb-run`` when there is no display::

    python scripts/make_screenshots.py               # writes docs/screenshots/*.png (~10 min, 2 CPU cores)
    python scripts/make_screenshots.py --steps 40    # quicker, blurrier results
    python scripts/make_screenshots.py --only share  # the Export BMZ shot alone (the bundled prior)

Look at every PNG before committing it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = (1500, 940)


def _reexec_under_xvfb() -> None:
    if os.environ.get("DISPLAY") or os.environ.get("NAPARI_HDN_NO_XVFB"):
        return
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        sys.exit("no display and no xvfb-run: install xvfb (apt-get install xvfb) or set DISPLAY")
    cmd = [xvfb, "-a", "-s", f"-screen 0 {SIZE[0] + 100}x{SIZE[1] + 100}x24",
           sys.executable, *sys.argv]
    sys.exit(subprocess.call(cmd, env={**os.environ, "NAPARI_HDN_NO_XVFB": "1"}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--steps", type=int, default=300, help="training steps per model")
    ap.add_argument("--samples", type=int, default=30, help="posterior samples for the MMSE")
    ap.add_argument("--only", choices=["share"], help="make one shot only: 'share' exports the "
                    "bundled prior as a BioImage Model Zoo package from the Predict widget")
    args = ap.parse_args(argv)
    _reexec_under_xvfb()
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-hdn")
    qwin = viewer.window._qt_window
    qwin.resize(*SIZE)
    app = QApplication.instance()

    def pump(seconds: float = 0.3) -> None:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.01)

    def wait_for(pred, timeout: float = 3600.0, what: str = "") -> None:
        t_end = time.perf_counter() + timeout
        while not pred():
            pump(0.1)
            if time.perf_counter() > t_end:
                raise TimeoutError(what)

    def shot(name: str) -> None:
        pump(0.6)
        path = args.out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        print("wrote", path, flush=True)

    def only_dock(name: str):
        for w in list(viewer.window.dock_widgets.values()):
            viewer.window.remove_dock_widget(w)
        dw, widget = viewer.window.add_plugin_dock_widget("napari-hdn", name)
        dw.setMinimumWidth(430)
        pump()
        return widget

    def share(pw) -> None:
        import tempfile

        out = Path(tempfile.mkdtemp()) / "hdn-fluorescence.zip"
        assert pw.export_bmz(out)
        wait_for(lambda: not pw.side_tasks["Export"].task.running, what="BMZ export")
        shot("09-share-export-bmz")

    if args.only == "share":
        from napari_hdn.engine.training.priors import PRIORS_DIR
        from napari_hdn.session import get_session

        viewer.open_sample("napari-hdn", "noisy-fluorescence")
        get_session().open_model_file(PRIORS_DIR / "fast-cpu.hdn")
        pw = only_dock("Predict and explore")
        pw.layer_combo.set_layer("noisy fluorescence")
        share(pw)
        return 0

    # 1. sample data and the noise model -----------------------------------------------------------
    viewer.open_sample("napari-hdn", "calibration-stack")
    viewer.open_sample("napari-hdn", "noisy-fluorescence")
    viewer.reset_view()
    shot("00-sample-data")
    nw = only_dock("Noise model")
    nw.set_source("calibration")
    nw.calib_layer.set_layer("calibration stack")
    viewer.layers["calibration stack"].visible = True
    viewer.layers.selection.active = viewer.layers["calibration stack"]
    assert nw.fit()
    wait_for(lambda: not nw.task.running, what="noise fit")
    viewer.layers.selection.active = viewer.layers["calibration stack"]
    viewer.reset_view()
    shot("01-noise-model")
    canvas = nw.show_large_figure()
    shot("01b-noise-diagnostics")
    viewer.window.remove_dock_widget(canvas)
    # the noise model lives on in the session; the stack's 50 frames would share the slider with
    # the samples layer later
    viewer.layers.selection.active = viewer.layers["noisy fluorescence"]
    viewer.layers.remove("calibration stack")
    pump(0.5)
    viewer.reset_view()
    pump(0.5)

    # 2. training ----------------------------------------------------------------------------------
    tw = only_dock("Training")
    tw.layer_combo.set_layer("noisy fluorescence")
    tw.preset.setCurrentText("fast CPU")
    tw.batch.setValue(8)
    tw.steps.setValue(args.steps)
    tw.steps_per_val.setValue(max(5, args.steps // 12))
    tw.device.setCurrentIndex(tw.device.findData("cpu"))
    assert tw.start_training()
    wait_for(lambda: tw.progress.value() >= int(0.6 * args.steps) or not tw.task.running,
             what="training (first part)")
    shot("02-training")
    wait_for(lambda: not tw.task.running, what="training")
    print(tw.status.text(), flush=True)

    # 3. predict -----------------------------------------------------------------------------------
    pw = only_dock("Predict and explore")
    pw.layer_combo.set_layer("noisy fluorescence")
    pw.n_samples.setValue(args.samples)
    assert pw.run_prediction()
    wait_for(lambda: not pw.task.running, what="prediction")
    viewer.layers["noisy fluorescence"].visible = False
    viewer.reset_view()
    shot("03-predict-mmse")
    smp = viewer.layers["HDN samples · noisy fluorescence"]
    smp.visible = True
    viewer.layers["HDN MMSE · noisy fluorescence"].visible = False
    viewer.dims.set_current_step(0, 3)
    viewer.layers.selection.active = smp
    shot("04-predict-samples")
    smp.visible = False
    viewer.layers["HDN variance · noisy fluorescence"].visible = True
    viewer.layers.selection.active = viewer.layers["HDN variance · noisy fluorescence"]
    shot("05-predict-variance")
    share(pw)

    # 4. artefact removal on the striped sample --------------------------------------------------
    for layer in viewer.layers:
        layer.visible = False
    viewer.open_sample("napari-hdn", "striped-fluorescence")
    viewer.reset_view()
    tw = only_dock("Training")
    tw.layer_combo.set_layer("striped fluorescence")
    tw.preset.setCurrentText("fast CPU")
    tw.batch.setValue(8)
    tw.steps.setValue(args.steps)
    tw.steps_per_val.setValue(max(5, args.steps // 12))
    tw.device.setCurrentIndex(tw.device.findData("cpu"))
    assert tw.start_training()
    wait_for(lambda: not tw.task.running, what="training on stripes")
    print(tw.status.text(), flush=True)

    aw = only_dock("Artefact removal")
    aw.layer_combo.set_layer("striped fluorescence")
    viewer.reset_view()
    cam = getattr(viewer, "scene", viewer).camera
    cam.zoom *= 2.0
    cam.center = (0.0, 96.0, 96.0)
    pump(0.5)
    assert aw.request_preview()
    wait_for(lambda: aw.previews_done >= 1 and not aw.preview_task.running, what="preview")
    shot("06-artefact-all-levels-on")
    n0 = aw.previews_done
    aw.set_level_modes({1: "prior-mean", 2: "prior-mean"})
    wait_for(lambda: aw.previews_done > n0 and not aw.preview_task.running, what="preview")
    print(aw.status.text(), flush=True)
    shot("07b-artefact-levels-1-2-off-preview")
    n0 = aw.previews_done
    aw.set_level_modes({1: "prior-mean", 2: "posterior"})
    wait_for(lambda: aw.previews_done > n0 and not aw.preview_task.running, what="preview")
    print(aw.status.text(), flush=True)
    shot("07-artefact-level-1-off-preview")

    aw.apply_samples.setValue(args.samples)
    assert aw.apply()
    wait_for(lambda: not aw.apply_task.running, what="apply")
    aw.set_level_modes({1: "posterior"})
    wait_for(lambda: not aw.preview_task.running, what="preview")
    assert aw.apply()
    wait_for(lambda: not aw.apply_task.running, what="apply")
    for layer in viewer.layers:
        layer.visible = layer.name in (
            "striped fluorescence", "HDN MMSE · striped fluorescence",
            "HDN MMSE · striped fluorescence · L1 prior-mean",
            "striped fluorescence ground truth")
    viewer.layers.remove("HDN preview · striped fluorescence")
    grid = getattr(getattr(viewer, "canvas", None), "grid", None) or viewer.grid  # napari >= 0.9
    grid.enabled = True
    grid.shape = (2, 2)
    viewer.reset_view()
    shot("08-artefact-apply-grid")
    grid.enabled = False

    wait_for(lambda: not any(t.running for t in (aw.preview_task, aw.apply_task)))
    pump(0.5)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
