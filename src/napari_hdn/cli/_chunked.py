"""``napari-hdn predict ... --out OUT.zarr``: prediction chunk by chunk into a zarr store, in this
process, on a LocalCluster (``--workers N``) or on an existing dask.distributed cluster
(``--scheduler ADDRESS``); rerunning an interrupted command resumes it."""

from __future__ import annotations

import sys
from pathlib import Path

from ._common import EXIT_INTERRUPTED, EXIT_OK, CLIError, Progress, SigintStop, check_numbers, parse_levels

ZARR_SUFFIXES = (".zarr", ".zr", ".ome.zarr")


def add_chunked_arguments(r) -> None:
    g = r.add_argument_group("large data (zarr output, clusters)")
    g.add_argument("--out", metavar="OUT.zarr",
                   help="write MMSE, variance (and samples) chunk by chunk into this zarr store: "
                   "memory stays that of one chunk; rerunning the same command after an "
                   "interruption computes only the missing chunks")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the chunks on an existing dask.distributed cluster (e.g. "
                   "tcp://head-node:8786; dask-jobqueue for SLURM/PBS); needs --out")
    g.add_argument("--workers", type=int, metavar="N",
                   help="start a local dask cluster of N single-thread worker processes; needs --out")
    g.add_argument("--channel", type=int, metavar="K",
                   help="channel to restore when the input has a channel axis (OME-Zarr c)")


def _is_zarr(path) -> bool:
    p = Path(path)
    return p.name.lower().endswith(ZARR_SUFFIXES) or (p.is_dir() and (
        (p / "zarr.json").exists() or (p / ".zarray").exists() or (p / ".zgroup").exists()))


def wants_chunked(args) -> bool:
    """The chunked path: --out, a zarr input, a cluster option, or --out-dir naming a .zarr."""
    if args.out_dir and str(args.out_dir).lower().endswith(ZARR_SUFFIXES) and not args.out:
        args.out = args.out_dir
    return bool(args.out or args.scheduler or args.workers or _is_zarr(args.noisy))


def run_chunked(args) -> int:
    from ..engine import StopFlag
    from ..engine.prediction.chunked import predict_to_zarr

    if not args.out:
        raise CLIError("a zarr input, --scheduler and --workers write a zarr store chunk by "
                       "chunk: give --out OUT.zarr")
    if args.out_dir and args.out_dir != args.out:
        raise CLIError("give --out OUT.zarr or --out-dir FOLDER, not both")
    if args.scheduler and args.workers:
        raise CLIError("give --scheduler (an existing cluster) or --workers (a local one), not both")
    check_numbers(args, workers="workers")
    if not str(args.out).rstrip("/").lower().endswith(ZARR_SUFFIXES):
        raise CLIError(f"--out {args.out}: the output is a zarr store; give it a name ending in .zarr")
    if Path(args.noisy).exists() is False:
        raise CLIError(f"input not found: {args.noisy}")
    if getattr(args, "tta", False) or getattr(args, "sampling", None):
        raise CLIError("--tta and --sampling are not available with a zarr output yet: leave them out "
                       "(the default sampling is used) or write TIFFs with --out-dir")
    if getattr(args, "suggest_levels", False):
        raise CLIError("--suggest-levels reads the whole image: run `napari-hdn levels MODEL CROP.tif` "
                       "on a crop, then give --deactivate LEVELS with --out")
    off = parse_levels(args.deactivate)
    levels = {lv: args.deactivate_mode for lv in off} if off else None
    stop = StopFlag()
    where = (f"on the cluster at {args.scheduler}" if args.scheduler else
             f"on a local cluster of {args.workers} workers" if args.workers else "in this process")
    with Progress(args.quiet) as bar, SigintStop(stop, "stopping: the chunks written are kept; "
                                                 "rerun the same command to finish"):
        res = predict_to_zarr(args.model, args.noisy, args.out, n_samples=args.samples,
                              axes=args.axes, levels=levels, seed=args.seed,
                              batch_size=args.batch_size, return_samples=args.save_samples,
                              tile_size=args.tile_size, margin=args.tile_overlap,
                              device=args.device, channel=args.channel, overwrite=args.overwrite,
                              scheduler=args.scheduler, workers=args.workers, callbacks=bar,
                              stop_flag=stop)
    info = res.info
    arrays = "mmse, variance" + (", samples" if res.samples is not None else "")
    levels_text = ", ".join(f"{i + 1}={m}" for i, m in enumerate(res.levels))
    if info["stopped"]:
        print(f"stopped: {info['chunks_done']} of {info['chunks']} chunks are in {args.out}; rerun "
              "the same command to compute the others", file=sys.stderr)
        return EXIT_INTERRUPTED
    resumed = (f"; {info['chunks_before']} were already there from an earlier run"
               if info["chunks_before"] else "")
    print(f"wrote {arrays} to {args.out} ({info['chunks_run']} of {info['chunks']} chunks computed "
          f"{where}{resumed}; {res.n_samples} samples; levels: {levels_text})")
    return EXIT_OK
