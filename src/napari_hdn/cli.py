"""The ``napari-hdn`` command line: a thin layer over the engine.

Exit codes: 0 success, 1 a runtime problem the user can fix (bad file, bad data, training
diverged), 2 a usage error (bad option), 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(Exception):
    """A user mistake detected by the CLI itself (exit code 1)."""


def _read_image(path: str):
    import numpy as np
    import tifffile

    p = Path(path)
    if not p.exists():
        raise CLIError(f"input file not found: {p}")
    try:
        arr = tifffile.imread(p)
    except Exception as exc:
        raise CLIError(f"could not read {p} as a TIFF image ({exc})") from None
    return np.asarray(arr)


def _parse_levels(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CLIError(f"--deactivate expects comma-separated level numbers like 1,2; got {text!r}") from None


def _progress(desc: str, unit: str, quiet: bool = False):
    """A callback that draws a tqdm bar from ProgressEvents; returns (callback, close)."""
    from tqdm import tqdm

    state: dict = {"bar": None}

    def cb(ev):
        if quiet:
            return
        if state["bar"] is None:
            state["bar"] = tqdm(total=ev.total or None, desc=desc, unit=unit, dynamic_ncols=True)
        bar = state["bar"]
        if ev.total and bar.total != ev.total:
            bar.total = ev.total
        bar.n = ev.step
        m = ev.metrics
        post = {}
        if "train_loss" in m:
            post["loss"] = f"{m['train_loss']:.4f}"
        if ev.kind == "epoch" and m.get("val_loss") is not None:
            state["val"] = m["val_loss"]
        if "val" in state:
            post["val"] = f"{state['val']:.4f}"
        if post:
            bar.set_postfix(post, refresh=False)
        bar.refresh()

    def close():
        if state["bar"] is not None:
            state["bar"].close()

    return cb, close


# -- train -------------------------------------------------------------------------------------
def _noise_model_from_args(args):
    from .engine.noise import GaussianNoiseModel, PoissonGaussianNoiseModel, load_noise_model

    given = [args.noise_model is not None, args.gaussian_sigma is not None,
             args.poisson_gain is not None]
    if sum(given) > 1:
        raise CLIError("give only one of --noise-model, --gaussian-sigma, --poisson-gain")
    if args.noise_model:
        return load_noise_model(args.noise_model)
    if args.gaussian_sigma is not None:
        return GaussianNoiseModel(args.gaussian_sigma)
    if args.poisson_gain is not None:
        return PoissonGaussianNoiseModel(args.poisson_gain, args.read_noise, args.offset)
    return None


def cmd_train(args) -> int:
    from .engine import ModelConfig, StopFlag, Trainer, TrainingConfig

    images = _read_image(args.noisy)
    noise = _noise_model_from_args(args)
    if noise is None and not args.resume:
        raise CLIError(
            "a noise model is needed: --noise-model FILE (see `napari-hdn noise-model fit`), "
            "--gaussian-sigma S, or --poisson-gain G --read-noise R"
        )
    arch = {k: getattr(args, k) for k in ("levels", "z_dim", "filters", "blocks")
            if getattr(args, k) is not None}
    if args.deactivate:
        arch["deactivated_levels"] = _parse_levels(args.deactivate)
    tcfg = {
        k: getattr(args, k)
        for k in ("patch_size", "batch_size", "max_steps", "val_fraction", "device", "seed", "lr",
                  "steps_per_epoch", "grad_clip")
        if getattr(args, k) is not None
    }
    try:
        mcfg = None if (args.resume and not arch) else ModelConfig(**arch)
        TrainingConfig(**tcfg)  # validate the options early
    except ValueError as exc:
        raise CLIError(f"invalid option: {_pydantic_message(exc)}") from None
    out = Path(args.out)
    ckdir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_suffix(".checkpoints")
    cb, close = _progress("training", "step", args.quiet)
    stop = StopFlag()
    trainer = Trainer(images, noise, axes=args.axes, model_config=mcfg, training_overrides=tcfg,
                      checkpoint_dir=ckdir, callbacks=cb, resume=args.resume, stop_flag=stop)
    try:
        model = trainer.run()
    except KeyboardInterrupt:
        close()
        stop.set()
        model = trainer.model
        trainer._finish(stopped=True)
        model.save(out)
        print(f"interrupted at step {trainer.step}: best model so far saved to {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    close()
    model.save(out)
    info = model.info
    print(f"saved {out} (steps {info['steps']}, best validation loss "
          f"{info['best_val_loss']:.4f}; checkpoints in {ckdir})")
    return EXIT_OK


def _pydantic_message(exc: Exception) -> str:
    errs = getattr(exc, "errors", None)
    if callable(errs):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs())
    return str(exc)


# -- predict -----------------------------------------------------------------------------------
def cmd_predict(args) -> int:
    import numpy as np
    import tifffile

    from .engine import load_model

    model = load_model(args.model)
    image = _read_image(args.noisy)
    levels = None
    off = _parse_levels(args.deactivate)
    if off:
        levels = {lv: args.deactivate_mode for lv in off}
    cb, close = _progress("sampling", "sample", args.quiet)
    try:
        res = model.predict(image, n_samples=args.samples, axes=args.axes, levels=levels,
                            tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                            batch_size=args.batch_size, seed=args.seed,
                            return_samples=args.save_samples, device=args.device, callbacks=cb)
    finally:
        close()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"levels": res.levels, "n_samples": res.n_samples, "seed": res.seed,
            "model": str(args.model)}
    desc = json.dumps(meta)
    tifffile.imwrite(out / "mmse.tif", res.mmse.astype(np.float32), description=desc)
    tifffile.imwrite(out / "variance.tif", res.variance.astype(np.float32), description=desc)
    written = ["mmse.tif", "variance.tif"]
    if res.samples is not None:
        tifffile.imwrite(out / "samples.tif", res.samples.astype(np.float32), description=desc)
        written.append("samples.tif")
    print(f"wrote {', '.join(written)} to {out} ({res.n_samples} samples; levels: "
          f"{', '.join(f'{i + 1}={m}' for i, m in enumerate(res.levels))})")
    return EXIT_OK


# -- demo --------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out_dir), minutes=args.minutes, seed=args.seed, device=args.device,
             quiet=args.quiet)
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench import run_speed_benchmark

    run_speed_benchmark(quick=args.quick, device=args.device, json_out=args.json)
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="napari-hdn",
        description="Hierarchical DivNoising (HDN): unsupervised denoising with posterior samples, "
        "uncertainty and latent-level artefact removal.",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"napari-hdn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train an HDN on a noisy image or stack",
                       description="Train an HDN on noisy data only (no clean images needed).")
    t.add_argument("noisy", help="noisy TIFF: YX, or a stack of frames (TYX/SYX/ZYX)")
    t.add_argument("--out", required=True, help="model file to write (e.g. model.hdn)")
    nm = t.add_argument_group("noise model (one of)")
    nm.add_argument("--noise-model", metavar="FILE", help="noise-model file from `noise-model fit`")
    nm.add_argument("--gaussian-sigma", type=float, metavar="S",
                    help="additive Gaussian noise of known standard deviation S (image units)")
    nm.add_argument("--poisson-gain", type=float, metavar="G",
                    help="Poisson-Gaussian noise: camera gain G (ADU per photon)")
    nm.add_argument("--read-noise", type=float, default=0.0, metavar="R",
                    help="with --poisson-gain: read-noise std R in ADU (default 0)")
    nm.add_argument("--offset", type=float, default=0.0, metavar="O",
                    help="with --poisson-gain: camera offset O in ADU (default 0)")
    a = t.add_argument_group("architecture (defaults: the paper's L=6, z=32, F=64, B=5)")
    a.add_argument("--levels", type=int, help="number of latent levels L (use 3 for tiny images)")
    a.add_argument("--z-dim", type=int, help="latent channels per level")
    a.add_argument("--filters", type=int, help="feature channels of every block")
    a.add_argument("--blocks", type=int, help="residual blocks per level")
    a.add_argument("--deactivate", metavar="LEVELS",
                   help="train with these levels (e.g. 1,2) deactivated, as the paper's HDN_3-6")
    o = t.add_argument_group("training")
    o.add_argument("--axes", help="axes of the input, e.g. YX, TYX, ZYX (default: guessed)")
    o.add_argument("--patch-size", type=int, help="square training patch side (default 64)")
    o.add_argument("--batch-size", type=int, help="patches per step (default 64)")
    o.add_argument("--max-steps", type=int, help="optimizer steps (default 20000)")
    o.add_argument("--steps-per-epoch", type=int, help="steps between validations (default: auto)")
    o.add_argument("--val-fraction", type=float, help="fraction of data held out (default 0.1)")
    o.add_argument("--lr", type=float, help="Adamax learning rate (default 3e-4)")
    o.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    o.add_argument("--device", help="auto (default), cpu, cuda or mps")
    o.add_argument("--seed", type=int, help="random seed (default 0; same seed, same CPU run)")
    o.add_argument("--checkpoint-dir", help="where best.hdn/last.hdn go (default: OUT.checkpoints)")
    o.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (e.g. last.hdn)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("predict", help="posterior samples, MMSE and variance of a noisy image",
                       description="Write mmse.tif and variance.tif (and samples.tif) to OUT_DIR.")
    r.add_argument("model", help="model file from `napari-hdn train`")
    r.add_argument("noisy", help="noisy TIFF to restore (YX or a stack of frames)")
    r.add_argument("--out-dir", required=True, help="folder for the output TIFFs")
    r.add_argument("--samples", type=int, default=100, help="posterior samples (default 100)")
    r.add_argument("--save-samples", action="store_true",
                   help="also write samples.tif (leading sample axis; memory: SAMPLES x image)")
    r.add_argument("--axes", help="axes of the input, e.g. YX, TYX (default: guessed)")
    r.add_argument("--tile-size", type=int,
                   help="tile side for large images (default: untiled up to 1024x1024, else 512)")
    r.add_argument("--tile-overlap", type=int, help="overlap between tiles (default 64)")
    r.add_argument("--batch-size", type=int, help="samples per pass (default: from image size)")
    r.add_argument("--deactivate", metavar="LEVELS",
                   help="latent levels to switch off, e.g. 1,2 (1 = finest); removes structured noise")
    r.add_argument("--deactivate-mode", choices=["prior-mean", "zero"], default="prior-mean",
                   help="what switched-off levels use: the prior mean (default) or zeros")
    r.add_argument("--device", help="auto (default), cpu, cuda or mps")
    r.add_argument("--seed", type=int, default=0, help="random seed of the samples (default 0)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="train and predict on built-in sample data (offline)",
                       description="Make a noisy fluorescence image with known ground truth, train "
                       "a small HDN for a few minutes, predict, and report PSNR.")
    d.add_argument("--out-dir", default="hdn-demo", help="output folder (default ./hdn-demo)")
    d.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="training and prediction speed benchmark",
                       description="Print training steps/s, achieved fraction of the machine's "
                       "conv2d throughput, and 100-sample prediction time (bottom-up reused vs "
                       "recomputed).")
    b.add_argument("--quick", action="store_true", help="small configuration only (about a minute)")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    b.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    b.set_defaults(func=cmd_bench)

    try:
        from .cli_noise import add_noise_model_parser
    except ImportError:  # the noise-model commands are optional while being developed
        pass
    else:
        add_noise_model_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``napari-hdn``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from .engine.errors import HDNError

    try:
        return int(args.func(args) or 0)
    except (HDNError, CLIError) as exc:
        print(f"napari-hdn: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("napari-hdn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("napari-hdn: error: out of memory; use a smaller --tile-size or --batch-size",
              file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"napari-hdn: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
