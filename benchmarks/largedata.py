"""Large data and clusters: memory, throughput, dask overhead and fault tolerance of chunked
prediction (``napari_hdn.engine.prediction.chunked``). A benchmark, not a test: it prints figures (and
``--json``) for docs/benchmarks.md.

    python -m benchmarks.largedata all --work /tmp/hdn-largedata          # every part
    python -m benchmarks.largedata memory --frames 16 --size 4096         # 1 GiB vs 256 MiB stack

Parts:
  memory      peak resident memory (fresh process each) of predicting a synthetic zarr stack of
              FRAMES x SIZE x SIZE float32 and of one 4x smaller (FRAMES / 4 frames), into zarr
  throughput  megapixels/s in this process vs a LocalCluster of 2 workers x 1 thread
  overhead    the dask/zarr path against plain tiled ``predict`` on an in-memory image
  kill-worker kill -9 one worker of a LocalCluster mid-run: the run completes, output compared
              with an undisturbed run
  kill-run    kill -9 the whole ``napari-hdn predict`` process mid-run, rerun: only the missing
              chunks are computed, output compared with an undisturbed run

The model is tiny and untrained (L3, z 4, F 8, B 1; the memory part L2, z 2, F 4, B 1;
prediction costs the same whatever the weights) and draws few samples, so that every part
finishes in minutes on 2 cores: the figures measure the machinery (memory, scheduling, I/O,
recovery), not a realistic model's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = dict(levels=3, z_dim=4, filters=8, blocks=1, dropout=0.0)
#: the memory part's model: smaller still, so that gigabytes of frames pass in minutes
MICRO = dict(levels=2, z_dim=2, filters=4, blocks=1, dropout=0.0)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([SRC, *[p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return e


def make_model(path: Path, cfg: dict = TINY) -> Path:
    import torch

    from napari_hdn.engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation

    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**cfg), GaussianNoiseModel(10.0), Normalisation(100.0, 30.0))
    model.ladder.train()
    with torch.no_grad():
        model.ladder(torch.randn(8, 1, 32, 32))
    model.ladder.eval()
    return model.save(path)


def make_stack(path: Path, frames: int, size: int, chunk: int = 1024) -> Path:
    """A synthetic noisy stack written frame by frame (never whole in memory)."""
    import zarr

    if path.exists():
        z = zarr.open_array(str(path), mode="r")
        if z.shape == (frames, size, size):
            return path
        shutil.rmtree(path)
    z = zarr.open_array(str(path), mode="w", shape=(frames, size, size),
                        chunks=(1, min(chunk, size), min(chunk, size)), dtype="float32",
                        dimension_names=["t", "y", "x"])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for f in range(frames):
        clean = 100 + 60 * np.sin(6.28 * (3 + f % 5) * yy) * np.cos(6.28 * 4 * xx)
        z[f] = (clean + rng.normal(0, 10, clean.shape)).astype(np.float32)
    return path


_WRAP = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _peak_rss_child(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of ``cmd`` in a fresh process. A fresh wrapper process runs
    it, so that the peak is this command's alone (RUSAGE_CHILDREN keeps the largest child ever)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAP, *cmd], check=True, env=env(),
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    return int(out.stdout.strip().splitlines()[-1]) / 1024, wall


def predict_cmd(model, src, out, samples, tile, extra=()) -> list[str]:
    return [sys.executable, "-m", "napari_hdn.cli", "predict", str(model), str(src), "--out",
            str(out), "--samples", str(samples), "--tile-size", str(tile), "--tile-overlap", "32",
            "--axes", "TYX", "--overwrite", "--quiet", *extra]


def part_memory(work: Path, model: Path, frames: int, size: int, samples: int, tile: int) -> dict:
    res = {}
    for n in (max(1, frames // 4), frames):
        src = make_stack(work / f"stack{n}.zarr", n, size)
        gib = n * size * size * 4 / 2**30
        peak, wall = _peak_rss_child(predict_cmd(model, src, work / f"out{n}.zarr", samples, tile))
        mpix = n * size * size / 1e6
        res[f"{n}x{size}x{size}"] = {"input_gib": round(gib, 2), "peak_rss_mb": round(peak),
                                     "wall_s": round(wall, 1),
                                     "mpix_per_s": round(mpix * samples / wall, 2)}
        shutil.rmtree(work / f"out{n}.zarr", ignore_errors=True)
        print(f"memory: {n} frames of {size}x{size} ({gib:.2f} GiB): peak RSS {peak:.0f} MB, "
              f"{wall:.0f} s", flush=True)
    return res


def part_throughput(work: Path, model: Path, samples: int) -> dict:
    from napari_hdn.engine.prediction.chunked import predict_to_zarr

    src = make_stack(work / "tp.zarr", 8, 1024)
    mpix = 8 * 1024 * 1024 / 1e6
    out = {}
    t = time.perf_counter()
    predict_to_zarr(model, src, work / "tp-here.zarr", samples, axes="TYX", tile_size=256,
                    margin=32, overwrite=True)
    wall = time.perf_counter() - t
    out["in_process"] = {"wall_s": round(wall, 1), "mpix_per_s": round(mpix * samples / wall, 3)}
    import distributed

    t0 = time.perf_counter()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        c.run(lambda: __import__("napari_hdn.engine.prediction.chunked"))  # workers import torch first
        start = time.perf_counter() - t0
        t = time.perf_counter()
        predict_to_zarr(model, src, work / "tp-cluster.zarr", samples, axes="TYX", tile_size=256,
                        margin=32, overwrite=True, scheduler=c)
        wall = time.perf_counter() - t
    out["local_cluster_2x1"] = {"wall_s": round(wall, 1), "startup_s": round(start, 1),
                                "mpix_per_s": round(mpix * samples / wall, 3),
                                "mpix_per_s_with_startup": round(mpix * samples / (wall + start), 3)}
    print(f"throughput: {json.dumps(out)}", flush=True)
    return out


def part_overhead(work: Path, model_path: Path, samples: int) -> dict:
    import dask

    from napari_hdn.engine import load_model, predict
    from napari_hdn.engine.prediction.chunked import predict_dask, predict_to_zarr

    model = load_model(model_path)
    import zarr

    img = np.asarray(zarr.open_array(str(make_stack(work / "ov.zarr", 2, 1024)), mode="r")[:])
    mpix = img.size / 1e6
    out = {}

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        out[name] = {"wall_s": round(wall, 2), "mpix_per_s": round(mpix * samples / wall, 3)}
        print(f"overhead: {name}: {wall:.1f} s", flush=True)

    from napari_hdn.engine.prediction.chunked import ChunkSpec
    from napari_hdn.engine.prediction.run import _tile_starts

    H, W = img.shape[-2:]
    frames = img.shape[0]

    def plain_pixels(tile, overlap):  # what predict() samples: whole tiles
        ys, xs = _tile_starts(H, tile, overlap, 8), _tile_starts(W, tile, overlap, 8)
        return frames * sum(min(tile, H - y) for y in ys) * sum(min(tile, W - x) for x in xs)

    def chunk_pixels(tile, margin):  # what the chunk tasks sample: chunk + margin windows
        spec = ChunkSpec(img.shape, tile, margin, 1, (), 0, None, False, None)
        tot = 0
        for idx in np.ndindex(*spec.grid):
            read, _, _ = spec.windows(idx)
            tot += (read[-2].stop - read[-2].start) * (read[-1].stop - read[-1].start)
        return tot

    # untiled predict (the whole 1024x1024 frame at once), tiles of 512 overlapping by 64 (32 on
    # each side of a seam), and the dask path with chunks of 512 and a 32-pixel margin: the
    # figure to compare is seconds per megapixel actually sampled (tiles and margins included)
    timed("plain predict, untiled", lambda: predict(model, img, samples, axes="TYX"))
    out["plain predict, untiled"]["sampled_mpix"] = frames * H * W / 1e6
    timed("plain tiled predict", lambda: predict(model, img, samples, axes="TYX", tile_size=512,
                                                 tile_overlap=64))
    out["plain tiled predict"]["sampled_mpix"] = plain_pixels(512, 64) / 1e6
    timed("predict_dask + compute (sync)", lambda: dask.compute(
        *(lambda r: (r.mmse, r.variance))(predict_dask(model_path, img, samples, axes="TYX",
                                                       tile_size=512, margin=32)),
        scheduler="sync"))
    timed("predict_to_zarr in-process", lambda: predict_to_zarr(
        model_path, img, work / "ov-out.zarr", samples, axes="TYX", tile_size=512, margin=32,
        overwrite=True))
    for k in ("predict_dask + compute (sync)", "predict_to_zarr in-process"):
        out[k]["sampled_mpix"] = chunk_pixels(512, 32) / 1e6
    for v in out.values():
        v["s_per_sampled_mpix"] = round(v["wall_s"] / (v["sampled_mpix"] * samples), 3)
    base = out["plain predict, untiled"]["s_per_sampled_mpix"]
    for k in out:
        out[k]["per_pixel_vs_untiled"] = round(out[k]["s_per_sampled_mpix"] / base, 3)
    return out


def part_kill_worker(work: Path, model: Path, samples: int) -> dict:
    import distributed
    import zarr

    from napari_hdn.engine.prediction.chunked import predict_to_zarr

    src = make_stack(work / "kw.zarr", 4, 1024)
    kw = dict(axes="TYX", tile_size=256, margin=32, overwrite=True)
    res = {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        predict_to_zarr(model, src, work / "kw-ref.zarr", samples, scheduler=c, **kw)
        pids = c.run(os.getpid)
        victim = sorted(pids.values())[0]
        killed = {}

        def on_event(ev):
            if ev.kind == "step" and not killed and ev.step >= ev.total // 3:
                os.kill(victim, signal.SIGKILL)
                killed.update(step=ev.step, total=ev.total)

        t = time.perf_counter()
        r = predict_to_zarr(model, src, work / "kw-run.zarr", samples, scheduler=c,
                            callbacks=on_event, **kw)
        res["wall_s"] = round(time.perf_counter() - t, 1)
        res["killed_worker_at_chunk"] = f"{killed.get('step')} of {killed.get('total')}"
        res["chunks_done"] = r.info["chunks_done"]
        res["workers_after"] = len(c.scheduler_info()["workers"])
    a = zarr.open_group(str(work / "kw-ref.zarr"), mode="r")
    b = zarr.open_group(str(work / "kw-run.zarr"), mode="r")
    for name in ("mmse", "variance"):
        res[f"{name}_max_abs_diff_vs_undisturbed"] = float(np.abs(np.asarray(a[name][...]) -
                                                                 np.asarray(b[name][...])).max())
    print(f"kill-worker: {json.dumps(res)}", flush=True)
    return res


def part_kill_run(work: Path, model: Path, samples: int) -> dict:
    import zarr

    src = make_stack(work / "kr.zarr", 4, 1024)
    ref, out = work / "kr-ref.zarr", work / "kr-run.zarr"
    subprocess.run(predict_cmd(model, src, ref, samples, 256), check=True, env=env())
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(predict_cmd(model, src, out, samples, 256), env=env())
    total, done = None, 0
    while proc.poll() is None:
        time.sleep(0.2)
        try:
            d = np.asarray(zarr.open_group(str(out), mode="r")["done"][...])
        except Exception:  # noqa: BLE001 - the store is not created yet
            continue
        total, done = d.size, int(d.sum())
        if done >= total // 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    before = int(np.asarray(zarr.open_group(str(out), mode="r")["done"][...]).sum())
    rerun = subprocess.run([c for c in predict_cmd(model, src, out, samples, 256)
                            if c != "--overwrite"], check=True, env=env(), capture_output=True,
                           text=True)
    g, r = zarr.open_group(str(out), mode="r"), zarr.open_group(str(ref), mode="r")
    res = {"chunks": total, "done_when_killed": before, "rerun_says": rerun.stdout.strip(),
           "chunks_after": int(np.asarray(g["done"][...]).sum())}
    for name in ("mmse", "variance"):
        res[f"{name}_max_abs_diff_vs_undisturbed"] = float(np.abs(np.asarray(g[name][...]) -
                                                                 np.asarray(r[name][...])).max())
    print(f"kill-run: {json.dumps(res)}", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["all", "memory", "throughput", "overhead", "kill-worker",
                                    "kill-run"])
    p.add_argument("--work", default="/tmp/hdn-largedata", help="scratch folder (GBs for memory)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--memory-samples", type=int, default=1)
    p.add_argument("--memory-tile", type=int, default=1024)
    p.add_argument("--json", help="write the figures to this file")
    a = p.parse_args(argv)
    import torch

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "tiny.hdn")
    parts = ["memory", "throughput", "overhead", "kill-worker", "kill-run"] if a.part == "all" \
        else [a.part]
    figures = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads()},
               "model": TINY, "samples": a.samples}
    for part in parts:
        t = time.perf_counter()
        if part == "memory":
            micro = make_model(work / "micro.hdn", MICRO)
            figures[part] = part_memory(work, micro, a.frames, a.size, a.memory_samples,
                                        a.memory_tile)
            figures["memory_model"] = MICRO
        elif part == "throughput":
            figures[part] = part_throughput(work, model, a.samples)
        elif part == "overhead":
            figures[part] = part_overhead(work, model, a.samples)
        elif part == "kill-worker":
            figures[part] = part_kill_worker(work, model, a.samples)
        else:
            figures[part] = part_kill_run(work, model, a.samples)
        print(f"[{part}: {time.perf_counter() - t:.0f} s]", flush=True)
    print(json.dumps(figures, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "main"
    sys.exit(main())
