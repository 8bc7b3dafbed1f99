"""Measure the artefact-removal preview latency in napari: time from a level toggle to the updated
preview layer, through the real widget (worker thread, cached bottom-up pass, layer update).

Run headless with a virtual display::

    xvfb-run -a python -m benchmarks.preview_latency --preset "fast CPU" --preset paper

Models get the architecture of the presets (engine/presets.py) (weights untrained: the cost of a
pass does not depend on the weights). Prints, per preset and crop, the median latency over
``--repeats`` toggles of level 1 and of level 2 to settings not seen before, and of level 1 back
to a setting seen before; the top-down time alone; and the one-off bottom-up time of the crop.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", help="preset(s) to time (engine/presets.py)")
    ap.add_argument("--side", type=int, action="append",
                    help="preview crop side(s); default: the widget's automatic choice")
    ap.add_argument("--samples", type=int, default=1, help="preview samples (widget default 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the widget jobs (default: the widgets' auto choice)")
    ap.add_argument("--settle", action="store_true",
                    help="let the background level description (started by the first switch-off) "
                    "finish before timing; without it the first toggles share the CPU with it")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds of idle event processing before each toggle (default 0: toggle "
                    "as soon as the previous preview is shown, while the viewer may still redraw)")
    args = ap.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_hdn.engine import GaussianNoiseModel, HDNModel, Normalisation
    from napari_hdn.engine.prediction.level_preview import auto_preview_side
    from napari_hdn.engine.training.presets import get_preset
    from napari_hdn.session import get_session
    from napari_hdn.widgets._workers import job_threads

    get_session().cpu_threads = args.threads
    presets = args.preset or ["fast CPU", "paper"]
    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-hdn", "striped-fluorescence")
    _, aw = viewer.window.add_plugin_dock_widget("napari-hdn", "Artefact removal")
    app = QApplication.instance()

    def wait_for(pred, timeout=120.0):
        t_end = time.perf_counter() + timeout
        while not pred():
            app.processEvents()
            time.sleep(0.002)
            if time.perf_counter() > t_end:
                raise TimeoutError

    print(f"torch {torch.__version__}, {job_threads(interactive=True)} threads in preview jobs, "
          f"{args.samples} preview sample(s)")
    for name in presets:
        torch.manual_seed(0)
        cfg = get_preset(name).model_config()
        model = HDNModel(cfg, GaussianNoiseModel(3.0), Normalisation(130.0, 20.0)).to("cpu")
        model.ladder.eval()
        get_session().add_model(model, name)
        aw.layer_combo.set_layer("striped fluorescence")
        aw.region.setCurrentText("crop")
        aw.preview_samples.setValue(args.samples)
        for side in args.side or [auto_preview_side(model)]:
            aw.live.setChecked(False)  # no previews while the crop is being set up
            aw.crop_size.setValue(side)
            aw.crop_y.setValue(0)
            aw.crop_x.setValue(0)
            n0 = aw.previews_done
            aw.request_preview()
            wait_for(lambda n0=n0: aw.previews_done > n0 and not aw.preview_task.running)
            first = aw.last_preview
            aw.live.setChecked(True)
            if args.settle:  # the first switch-off starts the level description in the
                # background (issue 9); let it finish so the toggles below time the preview alone
                n0 = aw.previews_done
                aw.mode_boxes[1].setCurrentText("prior-mean")
                wait_for(lambda n0=n0: aw.previews_done > n0 and not aw.suggest_task.running
                         and not aw.preview_task.running, timeout=600)
                aw.live.setChecked(False)
                aw.mode_boxes[1].setCurrentText("posterior")
                aw.live.setChecked(True)
            # Samplers keep the top-down states of earlier settings (engine: PosteriorSampler
            # reuse_mb): a toggle recomputes the toggled level and those below it, and a setting
            # seen before only the output head. "new" toggles forget the kept outputs of the
            # toggled level and below first, so each times a setting not seen before.
            series = [("level 1, new setting", 1, 1), ("level 2, new setting", 2, 2),
                      ("level 1, seen before", 1, 0)]
            for what, level, forget in series:
                times, td, nthreads = [], [], []
                for k in range(args.repeats):
                    t_pause = time.perf_counter() + args.pause  # a user's pause between toggles:
                    while time.perf_counter() < t_pause:  # the last preview's redraw ends meanwhile
                        app.processEvents()
                        time.sleep(0.002)
                    if forget:
                        for sampler in aw.cache.samplers.values():
                            sampler._states.drop(forget)
                    n0 = aw.previews_done
                    aw.mode_boxes[level].setCurrentText("prior-mean" if k % 2 == 0 else "posterior")
                    wait_for(lambda n0=n0: aw.previews_done > n0)
                    assert aw.last_preview["cached"]
                    times.append(aw.last_preview_seconds)
                    nthreads.append(aw.preview_task.threads)
                    td.append(aw.last_preview["top_down_s"])
                if args.repeats % 2:  # leave the level on for the next series
                    n0 = aw.previews_done
                    aw.mode_boxes[level].setCurrentText("posterior")
                    wait_for(lambda n0=n0: aw.previews_done > n0 and not aw.preview_task.running)
                print(f"{name:>9} ({cfg.levels} levels, F={cfg.filters}, B={cfg.blocks}) crop "
                      f"{side}x{side}, {what}: toggle -> preview {statistics.median(times):.2f} s "
                      f"median (min {min(times):.2f}, max {max(times):.2f}); top-down "
                      f"{statistics.median(td):.2f} s; bottom-up once {first['bottom_up_s']:.2f} s; "
                      f"threads {'/'.join(map(str, sorted(set(nthreads))))}",
                      flush=True)
    # the level description the widget starts in the background when a level is first switched
    # off (issue 9) must end too before the viewer closes
    wait_for(lambda: not aw.preview_task.running and not aw.suggest_task.running, timeout=600)
    t_end = time.perf_counter() + 0.3  # let the worker thread emit 'finished' before closing
    while time.perf_counter() < t_end:
        app.processEvents()
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
