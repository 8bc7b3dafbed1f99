"""``napari-hdn predict``: posterior samples, MMSE and variance of a noisy TIFF, as TIFFs."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from ._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    CLIError,
    Progress,
    SigintStop,
    parse_levels,
    read_tiff,
)


def add_parser(sub) -> None:
    r = sub.add_parser("predict", help="posterior samples, MMSE and variance of a noisy image",
                       description="Write mmse.tif and variance.tif (and samples.tif) to OUT_DIR. "
                       "Ctrl-C stops and writes the MMSE and variance of the samples drawn so far.")
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
    r.add_argument("--threads", type=int, help="CPU threads (default: torch's, all cores); fewer "
                   "leaves cores to other work")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import tifffile

    from ..engine import StopFlag, load_model, predict_in_rounds
    from ..engine.noise.diagnostics import cpu_threads

    model = load_model(args.model)
    image = read_tiff(args.noisy, "input")
    off = parse_levels(args.deactivate)
    levels = {lv: args.deactivate_mode for lv in off} if off else None
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, not {args.threads}")
    stop = StopFlag()
    threads = cpu_threads(args.threads) if args.threads else contextlib.nullcontext()
    with Progress(args.quiet) as bar, threads, \
            SigintStop(stop, "stopping: the samples drawn so far are kept"):
        res = predict_in_rounds(model, image, n_samples=args.samples, axes=args.axes, levels=levels,
                                tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                                batch_size=args.batch_size, seed=args.seed,
                                return_samples=args.save_samples, device=args.device, callbacks=bar,
                                stop_flag=stop)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stopped = bool(res.info.get("stopped"))
    meta = {"levels": res.levels, "n_samples": res.n_samples, "seed": res.seed,
            "model": str(args.model), "stopped": stopped, "n_requested": args.samples}
    desc = json.dumps(meta)
    tifffile.imwrite(out / "mmse.tif", res.mmse.astype(np.float32), description=desc)
    tifffile.imwrite(out / "variance.tif", res.variance.astype(np.float32), description=desc)
    written = ["mmse.tif", "variance.tif"]
    if res.samples is not None:
        tifffile.imwrite(out / "samples.tif", res.samples.astype(np.float32), description=desc)
        written.append("samples.tif")
    levels_text = ", ".join(f"{i + 1}={m}" for i, m in enumerate(res.levels))
    if stopped:
        print(f"stopped: wrote {', '.join(written)} of the {res.n_samples} of {args.samples} samples "
              f"drawn to {out} (levels: {levels_text})", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {', '.join(written)} to {out} ({res.n_samples} samples; levels: {levels_text})")
    return EXIT_OK
