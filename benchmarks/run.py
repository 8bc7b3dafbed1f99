"""The benchmark run: quality on every dataset, then speed and memory, then the report.

Each learned method gets the same wall-clock training budget on the same noisy images (the paper's
setting: train on the noisy data to be restored; ground truth only scores).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from napari_hdn.engine.metrics import psnr, ssim

from . import baselines
from .calibration import calibration
from .datasets import NAMES, Dataset, make_datasets
from .report import CROP
from .time_to_quality import in_fresh_process

ROOT = Path(__file__).resolve().parent.parent

# HDN trains with the product's default preset (the GUI's "fast CPU", the CLI's and the demo's
# default): the paper's L=6, F=64, B=5 does not fit budgets of minutes on 2 cores.
HDN_PRESET = "fast CPU"

PROFILES = {
    # size, images per dataset, training budgets (minutes) of each learned model, HDN samples
    # smoke: exercises every code path in seconds (tiny networks); its numbers mean nothing
    "smoke": dict(size=64, n_images=1, budgets_min=[0.005, 0.01], n_samples=3, speed=False,
                  hdn_arch=dict(levels=3, z_dim=2, filters=8, blocks=1, dropout=0.0), patch=32,
                  bootstrap_min=0.01, isolate=False, orientations_row=True),
    "quick": dict(size=96, n_images=2, budgets_min=[0.5, 1.0], n_samples=20, speed=True,
                  bootstrap_min=0.5, isolate=True),
    "full": dict(size=256, n_images=3, budgets_min=[2.0, 5.0, 10.0, 20.0], n_samples=100,
                 speed=True, bootstrap_min=5.0, isolate=True),
    # the full protocol on the sets the issue names: Poisson-Gaussian at two photon levels and
    # Gaussian; Noise2Void at 5 and 20 min only; no bootstrapped noise model, no speed section
    # (per set about 25 min for HDN and 25 for Noise2Void unless --reuse-n2v; --datasets and
    # --keep split a run over sessions)
    "core": dict(size=256, n_images=3, budgets_min=[2.0, 5.0, 10.0, 20.0], n_samples=100,
                 speed=False, bootstrap_min=None, isolate=True,
                 datasets=["fluo20", "fluo100", "natural25"], orientations_row=True,
                 n2v_budgets_min=[5.0, 20.0]),
}
# isolate: each timed training in a fresh process (see time_to_quality.in_fresh_process); the smoke
# profile skips it (it measures nothing, and a spawn costs seconds)


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def hdn_settings(prof: dict) -> tuple[dict, dict]:
    """Architecture and training settings of the benchmark's HDN (the default preset)."""
    from napari_hdn.engine import ModelConfig
    from napari_hdn.engine.training.presets import get_preset
    from napari_hdn.engine.training.priors import bundled_prior_for

    preset = get_preset(HDN_PRESET)
    arch = prof.get("hdn_arch") or dict(preset.model)
    training = {**preset.training, "patch_size": prof.get("patch", preset.training.get("patch_size", 64)),
                # the paper's setting: train on the images to restore, all of them
                "val_fraction": 0.0}
    if training.get("init") == "prior" and bundled_prior_for(ModelConfig(**arch)) is None:
        training["init"] = "scratch"  # a profile's own small network (smoke): no prior fits it
    return arch, training


#: suffix of the rows whose MMSE averages the 8 flips/rotations (``predict(tta=True)``)
ORIENTED = ", 8 orientations"
STRIPE_LEVELS = (("", None), (", level 1 prior-mean", {1: "prior-mean"}),
                 (", levels 1-2 prior-mean", {1: "prior-mean", 2: "prior-mean"}),
                 (", level 1 zero", {1: "zero"}), (", levels 1-2 zero", {1: "zero", 2: "zero"}))


def hdn_curve(noisy, clean, noise_model, budgets_min, seed: int, prof: dict, stripes: bool) -> list:
    """Train HDN once up to the largest budget and score the model at each budget.

    Runs in a fresh process (see ``in_fresh_process``). Returns one entry per scored setting:
    ``(suffix, minutes, mmse list, extra dict, variance of the first image or None)``; the last
    budget also gets the uncertainty calibration and, on striped data, every level setting.
    """
    from .time_to_quality import train_with_snapshots

    arch, training = hdn_settings(prof)
    snaps = train_with_snapshots(noisy, noise_model, arch, training, budgets_min, seed=seed,
                                 log=lambda *a: None)
    n = prof["n_samples"]
    out = []
    for k, snap in enumerate(snaps):
        last = k == len(snaps) - 1
        settings = [(suffix, levels, False) for suffix, levels in
                    (STRIPE_LEVELS if (last and stripes) else (("", None),))]
        if prof.get("orientations_row") and not stripes:
            settings.append((ORIENTED, None, True))
        for suffix, levels, tta in settings:
            if levels and len(levels) >= snap["model"].config.levels:
                continue  # every level off: refused (the result would ignore the image)
            t = time.perf_counter()
            # 8 orientations: the same number of top-down passes, spread over the 8 flips/rotations
            n_each = -(-n // 8) if tta else n
            res = [snap["model"].predict(x, n_samples=n_each, seed=seed, levels=levels, tta=tta,
                                         return_samples=last and not tta) for x in noisy]
            extra = {"train_steps": snap["steps"], "train_seconds": snap["minutes"] * 60,
                     "predict_seconds": time.perf_counter() - t, "n_samples": n_each * (8 if tta else 1),
                     "levels": res[0].levels, "budget_min": snap["minutes"],
                     "seconds_per_step": snap["seconds_per_step"]}
            if tta:
                extra["orientations"] = 8
            if last and not tta:
                cal = [calibration(r.samples, r.mmse, g) for r, g in zip(res, clean)]
                extra.update(std_error_corr=_mean_or_none([c["std_error_corr"] for c in cal]),
                             coverage95=float(np.mean([c["coverage95"] for c in cal])))
            variance = res[0].variance if (last and levels is None and not tta) else None
            out.append((suffix, snap["minutes"], [r.mmse for r in res], extra, variance))
    return out


def n2v_run(noisy, budget_s: float, seed: int, patch: int) -> tuple[list, int, float]:
    """Noise2Void trained for ``budget_s`` (fresh process): predictions, steps, training seconds."""
    from . import learned

    (den, steps), t = _timed(learned.train_n2v, noisy, budget_s, seed, patch)
    return [learned.predict_n2v(den, x) for x in noisy], steps, t


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def score(pred: np.ndarray, gt: np.ndarray) -> dict:
    return {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt)}


def evaluate_dataset(ds: Dataset, prof: dict, seed: int, log) -> dict:
    from . import learned

    out: dict = {"description": ds.description, "noise": ds.noise, "n_images": len(ds.noisy),
                 "size": prof["size"], "methods": {}, "timing_s": {}}
    methods = out["methods"]
    crops: dict[str, np.ndarray] = {}

    def add(name, preds, seconds, extra=None):
        per = [score(p, g) for p, g in zip(preds, ds.clean)]
        methods[name] = {
            "psnr": [r["psnr"] for r in per], "ssim": [r["ssim"] for r in per],
            "psnr_mean": float(np.mean([r["psnr"] for r in per])),
            "ssim_mean": float(np.mean([r["ssim"] for r in per])),
            **(extra or {}),
        }
        out["timing_s"][name] = seconds
        crops[name] = preds[0]
        log(f"  {ds.name:9s} {name:28s} PSNR {methods[name]['psnr_mean']:6.2f}  "
            f"SSIM {methods[name]['ssim_mean']:.3f}  ({seconds:.0f} s)")

    add("noisy input", ds.noisy, 0.0)
    for name, fn in [("NL-means", baselines.nl_means), ("TV", baselines.total_variation)]:
        preds, t = _timed(lambda f=fn: [f(x, ds.noise) for x in ds.noisy])
        add(name, preds, t)
    if baselines.bm3d_available():
        preds, t = _timed(lambda: [baselines.bm3d(x, ds.noise) for x in ds.noisy])
        add("BM3D", preds, t)

    patch = prof.get("patch", min(64, prof["size"]))
    budgets = prof["budgets_min"]

    def fresh(fn, *args):
        return in_fresh_process(fn, *args) if prof["isolate"] else fn(*args)

    out["budgets_min"] = budgets
    # Noise2Void: one run per budget (its learning rate follows a cosine over the budget)
    pseudo = None
    reused = (prof.get("reuse_n2v") or {}).get(ds.name, {}).get("methods", {})
    for b in prof.get("n2v_budgets_min", budgets) if not reused else []:
        (preds, n2v_steps, t_n2v), t_all = _timed(fresh, n2v_run, ds.noisy, 60.0 * b,
                                                  seed, patch)
        add(f"Noise2Void (built-in), {b:g} min", preds, t_all,
            {"train_steps": n2v_steps, "budget_min": b, "method": "Noise2Void (built-in)",
             "seconds_per_step": t_n2v / max(n2v_steps, 1)})
        if pseudo is None or b <= (prof["bootstrap_min"] or 0):
            pseudo = preds

    for name, entry in reused.items():  # Noise2Void figures of an earlier run (--reuse-n2v)
        if entry.get("method") == "Noise2Void (built-in)":
            methods[name] = {**entry, "reused": prof["reuse_n2v_from"]}
            out["timing_s"][name] = entry.get("budget_min", 0) * 60
            log(f"  {ds.name:9s} {name:28s} PSNR {entry['psnr_mean']:6.2f}  (from "
                f"{prof['reuse_n2v_from']})")
    boot = prof["bootstrap_min"] is not None
    nm_cal, t_cal = _timed(learned.calibration_noise_model, ds.calibration, seed)
    out["noise_models"] = {"calibration": learned.describe(nm_cal), "fit_seconds": {"calibration": t_cal}}
    if boot:
        nm_boot, t_boot = _timed(learned.bootstrap_noise_model, ds.noisy, pseudo, seed)
        out["noise_models"]["bootstrap"] = learned.describe(nm_boot)
        out["noise_models"]["fit_seconds"]["bootstrap"] = t_boot

    runs = [("HDN MMSE, calibration noise model", nm_cal, budgets, ds.name == "stripes")]
    if ds.name != "stripes" and boot:
        runs.append(("HDN MMSE, bootstrapped noise model", nm_boot, [prof["bootstrap_min"]], False))
    for label, nm, marks, stripes in runs:
        entries = fresh(hdn_curve, ds.noisy, ds.clean, nm, marks, seed, prof, stripes)
        for suffix, minutes, preds, extra, variance in entries:
            add(f"{label}, {minutes:g} min{suffix}", preds,
                extra["train_seconds"] + extra["predict_seconds"],
                {**extra, "method": label + (ORIENTED if extra.get("orientations") else "")})
            if variance is not None and label.startswith("HDN MMSE, calibration"):
                crops["HDN variance"] = variance
    out["_crops"] = crops
    out["_truth"] = ds.clean[0]
    return out


def speed_section(quick: bool, log) -> dict:
    from napari_hdn import bench
    from napari_hdn.engine.training.presets import PRESETS

    from . import learned, speed

    dev = "cpu"
    small = PRESETS["fast CPU"].model
    out: dict = {}
    conv = bench._run(bench.task_conv, dev, 3 if quick else 5)
    out["conv2d_gflops"] = conv["conv2d_gflops"]
    log(f"  conv2d 3x3 64ch fwd+bwd: {conv['conv2d_gflops']:.1f} GFLOP/s")
    names = bench.TIMED_PRESETS[:1] if quick else bench.TIMED_PRESETS
    out["training"] = {}
    for name in names:
        preset = PRESETS[name]
        r = bench._run(bench.task_train, dev, preset.model, preset.training, 2 if name == "paper" else 3)
        r["fraction_of_conv2d"] = r["train_gflops"] / conv["conv2d_gflops"]
        out["training"][name] = r
        log(f"  train {name}: {r['steps_per_s']:.3f} steps/s, "
            f"{100 * r['fraction_of_conv2d']:.0f}% of conv2d, peak {r['peak_memory_mb']:.0f} MB")
    size = 128 if quick else 512
    n = 20 if quick else 100
    reuse = bench._run(bench.task_predict, dev, small, size, n)
    recompute = bench._run(speed.task_reference_predict, dev, small, size, n)
    out["prediction"] = {"size": size, "n_samples": n, "config": "fast CPU", "reuse_s": reuse["seconds"],
                         "recompute_s": recompute["seconds"],
                         "speedup": recompute["seconds"] / reuse["seconds"],
                         "peak_memory_mb": reuse["peak_memory_mb"]}
    log(f"  predict {n} samples {size}x{size}: {reuse['seconds']:.1f} s vs {recompute['seconds']:.1f} s "
        f"recomputed ({out['prediction']['speedup']:.2f}x)")
    big = 1024 if quick else 4096
    tm = bench._run(speed.task_tiled_memory, dev, small, big, 512, 1)
    out["tiled"] = {"size": big, "tile": 512, "n_samples": 1, **tm}
    log(f"  tiled {big}x{big}, 1 sample: peak {tm['peak_memory_mb']:.0f} MB, {tm['seconds']:.0f} s")
    lat = bench._run(speed.task_toggle_latency, dev, small, 256, 4, 5)
    out["toggle_preview"] = {"crop": 256, "n_samples": 4, "config": "small", **lat}
    log(f"  toggle preview 256x256, 4 samples: {lat['median_seconds']:.2f} s")
    fit = learned.gmm_fit_speed(10_000_000 if not quick else 1_000_000)
    out["gmm_fit"] = fit
    log(f"  GMM fit on {fit['pairs']:,} pairs: {fit['seconds']:.1f} s")
    return out


class _CpuLock:
    """An advisory lock file (``flock``) held while a dataset is measured, so that other jobs on the
    machine that honour the same file wait instead of distorting the timings; no-op without a path."""

    def __init__(self, path: str | None):
        self.path, self.fd = path, None

    def __enter__(self):
        if self.path:
            import fcntl

            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


#: settings that a results file given to ``keep`` must share with the run
KEPT_MUST_MATCH = ("size", "n_images", "budgets_min", "n_samples", "hdn_arch", "hdn_training",
                   "hdn_preset", "hdn_prior")


def _earlier(path: str, profile: str, seed: int) -> dict:
    earlier = json.loads(Path(path).read_text())
    if earlier["profile"] != profile or earlier["settings"]["seed"] != seed:
        raise ValueError(f"{path} is a run of profile {earlier['profile']!r}, seed "
                         f"{earlier['settings']['seed']}: give one of {profile!r}, seed {seed}")
    return earlier


def _crops_file(results_file: Path) -> Path:
    """Where the crops of a results file are kept (the figure's 96x96 corner of the first image)."""
    return results_file.with_name(results_file.stem + "-crops.npz")


def _save_crops(crops: dict, path: Path) -> None:
    arrays = {}
    for ds, (imgs, truth) in crops.items():
        for name, img in {**imgs, "truth": truth}.items():
            arrays[f"{ds}|{name}"] = np.asarray(img, np.float32)[:CROP, :CROP]
    np.savez_compressed(path, **arrays)


def _load_crops(path: Path, names) -> dict:
    if not path.exists():
        return {}
    out: dict = {}
    with np.load(path) as z:
        for key in z.files:
            ds, name = key.split("|", 1)
            if ds in names:
                imgs, truth = out.setdefault(ds, ({}, None))
                if name == "truth":
                    out[ds] = (imgs, z[key])
                else:
                    imgs[name] = z[key]
    return {ds: v for ds, v in out.items() if v[1] is not None}


def rewrite_report(results_file: str, docs_dir: Path | None = None) -> Path:
    """Write the report of a saved results file again (with its saved crops), e.g. after the
    report's layout changed; nothing is measured."""
    from .report import write_report

    results = json.loads(Path(results_file).read_text())
    crops = _load_crops(_crops_file(Path(results_file)), results["datasets"])
    return write_report(results, crops, Path(docs_dir) if docs_dir else ROOT / "docs")


def run(profile: str = "quick", seed: int = 0, out_dir: Path | None = None,
        docs_dir: Path | None = None, docs: bool = True, log=print, lock: str | None = None,
        reuse_n2v: str | None = None, datasets: list[str] | None = None,
        keep: str | None = None) -> dict:
    """Run one profile ("smoke", "quick" or "full"); write JSON results and the report.

    ``lock``: a lock file held (``flock``) while each dataset is measured, released in between.
    ``reuse_n2v``: a results file of an earlier run of the same profile and seed whose Noise2Void
    figures are taken instead of training it again (it did not change; HDN did). Its bootstrapped
    noise model, which needs Noise2Void's predictions, is then skipped.
    ``datasets``: measure only these (default: the profile's list, or every dataset).
    ``keep``: a results file of an earlier run of the same profile and seed; its datasets that this
    run does not measure are carried into the results unchanged, each marked with the file and
    date it was measured in (and their crops, where that run saved them).
    """
    import torch

    prof = dict(PROFILES[profile])
    if datasets:
        unknown = sorted(set(datasets) - set(NAMES))
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}: choose from {sorted(NAMES)}")
        prof["datasets"] = list(datasets)
    if reuse_n2v:
        earlier = _earlier(reuse_n2v, profile, seed)
        prof.update(reuse_n2v=earlier["datasets"], reuse_n2v_from=Path(reuse_n2v).name,
                    bootstrap_min=None)
    kept = _earlier(keep, profile, seed) if keep else None
    t0 = time.perf_counter()
    arch, training = hdn_settings(prof)
    results: dict = {
        "profile": profile, "settings": {"hdn_arch": arch, "seed": seed,
                                         **{k: v for k, v in prof.items() if k != "reuse_n2v"},
                                         "hdn_training": training, "hdn_preset": HDN_PRESET},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__, "threads": torch.get_num_threads()},
        "datasets": {},
    }
    if kept:  # carried-over figures must describe the same protocol and the same HDN
        differ = [k for k in KEPT_MUST_MATCH if kept["settings"].get(k) != results["settings"].get(k)]
        if differ:
            raise ValueError(f"{keep} was measured with other settings ({', '.join(differ)}): its "
                             "datasets cannot stand beside this run's; measure them again instead")
    if training.get("init") == "prior":  # what the HDN runs start from (not counted in the budget)
        from napari_hdn.engine import ModelConfig
        from napari_hdn.engine.training.priors import bundled_prior_for, bundled_priors

        name = bundled_prior_for(ModelConfig(**arch))
        recipes = {n: r for n, _, r in bundled_priors()}
        results["settings"]["hdn_prior"] = {"file": name, **recipes[name]}
    try:
        import skimage

        results["machine"]["scikit-image"] = skimage.__version__
    except ImportError:
        pass
    crops = {}
    for ds in make_datasets(prof["size"], prof["n_images"], seed):
        if prof.get("datasets") and ds.name not in prof["datasets"]:
            continue
        log(f"dataset {ds.name}: {ds.description}")
        with _CpuLock(lock):
            t_ds = time.perf_counter()
            r = evaluate_dataset(ds, prof, seed, log)
        crops[ds.name] = (r.pop("_crops"), r.pop("_truth"))
        r["measured"] = {"date": time.strftime("%Y-%m-%d"), "minutes": (time.perf_counter() - t_ds) / 60}
        results["datasets"][ds.name] = r
    if kept:
        for name, r in kept["datasets"].items():
            if name not in results["datasets"]:
                results["datasets"][name] = {**r, "kept_from": r.get("kept_from") or {
                    "file": Path(keep).name, "date": r.get("measured", {}).get("date", kept.get("date")),
                    "machine": kept["machine"]["platform"]}}
        crops.update({k: v for k, v in _load_crops(_crops_file(Path(keep)), kept["datasets"]).items()
                      if k not in crops})
        results["datasets"] = dict(sorted(results["datasets"].items(),
                                          key=lambda kv: NAMES.index(kv[0]) if kv[0] in NAMES else 99))
    if prof["speed"]:
        log("speed and memory")
        with _CpuLock(lock):
            results["speed"] = speed_section(profile != "full", log)
    results["duration_s"] = time.perf_counter() - t0
    results["date"] = time.strftime("%Y-%m-%d")
    out_dir = Path(out_dir) if out_dir else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{profile}.json").write_text(json.dumps(results, indent=2))
    _save_crops(crops, _crops_file(out_dir / f"{profile}.json"))
    if docs:
        from .report import write_report

        write_report(results, crops, Path(docs_dir) if docs_dir else ROOT / "docs")
    log(f"done in {results['duration_s'] / 60:.1f} min")
    return results
