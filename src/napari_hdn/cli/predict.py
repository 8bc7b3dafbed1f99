"""``napari-hdn predict``: posterior samples, MMSE and variance of a noisy TIFF, as TIFFs; or of
data larger than memory, chunk by chunk into a zarr store (``--out OUT.zarr``, see
:mod:`._chunked`)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ._chunked import add_chunked_arguments, run_chunked, wants_chunked
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    CLIError,
    Progress,
    SigintStop,
    check_numbers,
    check_outputs,
    parse_levels,
    read_tiff,
    resolve_axes,
)
from .levels import MODE_CHOICES


def add_parser(sub) -> None:
    r = sub.add_parser("predict", help="posterior samples, MMSE and variance of a noisy image",
                       description="Write mmse.tif and variance.tif (and samples.tif) to OUT_DIR. "
                       "Ctrl-C stops and writes the MMSE and variance of the samples drawn so far.")
    r.add_argument("model", help="model file from `napari-hdn train`")
    r.add_argument("noisy", help="noisy TIFF to restore (YX or a stack of frames), or a zarr / "
                   "OME-Zarr store (predicted chunk by chunk into --out)")
    r.add_argument("--out-dir", help="folder for the output TIFFs")
    add_chunked_arguments(r)
    r.add_argument("--overwrite", action="store_true",
                   help="replace mmse.tif, variance.tif and samples.tif in OUT_DIR if they exist")
    r.add_argument("--samples", type=samples_arg, default="auto", metavar="N|auto",
                   help="posterior samples per frame (default auto: until the MMSE is within "
                   "0.05 dB of 100 independent samples' expected PSNR, 8 to 100 per frame; a "
                   "number forces that many)")
    r.add_argument("--save-samples", action="store_true",
                   help="also write samples.tif (leading sample axis; memory: SAMPLES x image)")
    r.add_argument("--axes", help="axes of the input, e.g. YX, TYX, CYX, YXC (default: the "
                   "file's, else guessed; (Y, X, 3) is RGB)")
    r.add_argument("--tile-size", type=int,
                   help="tile side for large images (default: untiled up to 1024x1024, else 512)")
    r.add_argument("--tile-overlap", type=int, help="overlap between tiles (default 64)")
    r.add_argument("--batch-size", type=int, help="samples per pass (default: from image size)")
    r.add_argument("--deactivate", metavar="LEVELS",
                   help="latent levels to switch off, e.g. 1,2 (1 = finest); removes structured noise")
    r.add_argument("--deactivate-mode", choices=MODE_CHOICES, default="prior-mean",
                   help="what switched-off levels use: the mean of the prior given the levels "
                   "above (default), draws from that prior (the MMSE averages over them), or zeros")
    r.add_argument("--suggest-levels", action="store_true",
                   help="switch off the levels `napari-hdn levels` suggests (the bottom levels "
                   "whose removal looks like an artefact, not like detail of the image)")
    r.add_argument("--sampling", choices=["antithetic", "stratified", "independent"],
                   help="latent-noise scheme (default antithetic: samples in pairs with opposite "
                   "latent noise: an MMSE as good with far fewer samples; docs/benchmarks.md)")
    r.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over the 8 flips/rotations (8x the work; "
                   "not with --save-samples)")
    r.add_argument("--device", help="auto (default), cpu, cuda or mps")
    r.add_argument("--seed", type=int, default=0, help="random seed of the samples (default 0)")
    r.add_argument("--threads", type=int, help="CPU threads (default: torch's, all cores); fewer "
                   "leaves cores to other work")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=run)


def samples_arg(text: str):
    """``--samples``: "auto" or a whole number (checked with the other numbers)."""
    import argparse

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', not {text!r}") \
            from None


NUMBERS = dict(n_samples="samples", tile_size="tile_size", tile_overlap="tile_overlap",
               batch_size="batch_size", seed="seed", threads="threads")


def check_levels(args, model, image, axes, off: list[int]):
    """Describe the levels on a crop: the suggested setting (``--suggest-levels``), or a warning
    when a level of ``--deactivate`` removes what looks like detail of the image."""
    from ..engine import describe_levels
    from ..engine.data.arrays import check_axes

    check_axes(axes, image.shape)  # before any work, as predict itself checks them
    quick = not args.suggest_levels  # a warning check costs less than a suggestion
    rep = describe_levels(model, image, n_samples=4 if quick else 8, mode=args.deactivate_mode,
                          seed=args.seed, crop=128 if quick else 256, device=args.device)
    if args.suggest_levels:
        for line in rep.lines():
            print(f"levels: {line}", file=sys.stderr)
        return {lv: rep.mode for lv in rep.levels_off} or None
    signal = [s.level for s in rep.steps if s.level in off and s.verdict == "signal"]
    if signal:
        print(f"napari-hdn: warning: switching off level(s) {', '.join(map(str, signal))} removes "
              "what looks like detail of the image, not an artefact (where the image has "
              "structure); the MMSE may lose real structure. `napari-hdn levels` shows the "
              "figures; --suggest-levels picks a safer setting", file=sys.stderr)
    return {lv: args.deactivate_mode for lv in off}


def run(args) -> int:
    check_numbers(args, **NUMBERS)
    if wants_chunked(args):
        return run_chunked(args)
    if getattr(args, "channel", None) is not None:
        raise CLIError(f"--channel {args.channel} picks the channel of a chunked prediction (--out "
                       "OUT.zarr); with --out-dir every channel of the image is restored: leave "
                       "--channel out, or write a zarr store")
    if not args.out_dir:
        raise CLIError("give --out-dir FOLDER (TIFF outputs) or --out OUT.zarr (a zarr store "
                       "written chunk by chunk)")
    if args.tta and args.save_samples:
        raise CLIError("--tta averages over 8 orientations and keeps no samples: drop --tta or "
                       "--save-samples")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out-dir {out} is a file, not a folder")
    names = ["mmse.tif", "variance.tif"] + (["samples.tif"] if args.save_samples else [])
    from ..engine.files.locks import check_unlocked, output_lock

    lock = [(out, "output folder (--out-dir)", "wait for it to finish or choose another --out-dir")]
    check_unlocked(lock)  # a prediction still writing there is named as such
    check_outputs([(out / n, n) for n in names], [args.model, args.noisy], args.overwrite)
    with output_lock(*lock[0], note=lambda t: print(f"napari-hdn: note: {t}", file=sys.stderr)):
        check_outputs([(out / n, n) for n in names], [args.model, args.noisy], args.overwrite)
        return _run_tiff(args, out)


def check_kept_samples(args, image) -> None:
    """Before any work: the samples --save-samples keeps (a float32 copy of the image per sample,
    held until they are written) fit in the memory this machine has free."""
    from ..engine.device import available_memory

    if not args.save_samples or not isinstance(args.samples, int):
        return
    avail = available_memory()
    per = 4.0 * image.size
    need = per * args.samples
    if avail is None or need <= 0.8 * avail:
        return
    best = int(0.8 * avail // per)
    fix = (f"give --samples {best} or fewer" if best >= 1 else "leave out --save-samples")
    raise CLIError(f"--save-samples with --samples {args.samples} keeps {need / 2**30:.3g} GiB of "
                   f"samples and this machine has {avail / 2**30:.3g} GiB free: {fix}, or write a "
                   "zarr store chunk by chunk (--out OUT.zarr)")


def _run_tiff(args, out: Path) -> int:
    import numpy as np

    from ..engine import InputError, StopFlag, load_model, predict_in_rounds
    from ..engine.data.imageio import write_tiff as write_image
    from ..engine.data.layout import layout_of
    from ..engine.network.multichannel import check_channels
    from ..engine.prediction.run import check_some_level_active
    from ..engine.threads import at_most

    model = load_model(args.model)
    image, declared, meta = read_tiff(args.noisy, "input", with_meta=True)
    check_kept_samples(args, image)
    axes = resolve_axes(args.axes, declared, args.noisy)
    lay = layout_of(image.shape, axes)
    check_channels(model, lay, str(args.noisy))
    off = parse_levels(args.deactivate)
    if off and args.suggest_levels:
        raise CLIError("give --deactivate LEVELS or --suggest-levels, not both")
    levels = {lv: args.deactivate_mode for lv in off} if off else None
    try:
        check_some_level_active(model.resolve_modes(levels))
    except InputError as exc:
        raise CLIError(f"--deactivate {args.deactivate}: {exc}") from None
    if lay.has_channels and args.suggest_levels:
        raise CLIError("--suggest-levels analyses one channel: run `napari-hdn levels MODEL NOISY "
                       "--channel K` for each, then give --deactivate LEVELS (they apply to every "
                       "channel)")
    if (off or args.suggest_levels) and not lay.has_channels:
        levels = check_levels(args, model, image, axes, off)
    stop = StopFlag()
    threads = at_most(args.threads) if args.threads else contextlib.nullcontext()
    with Progress(args.quiet) as bar, threads, \
            SigintStop(stop, "stopping: the frames finished so far are kept" if args.samples == "auto"
                       else "stopping: the samples drawn so far are kept"):
        res = predict_in_rounds(model, image, n_samples=args.samples, axes=axes, levels=levels,
                                tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                                batch_size=args.batch_size, seed=args.seed,
                                return_samples=args.save_samples, device=args.device, callbacks=bar,
                                stop_flag=stop, sampling=args.sampling, tta=args.tta)
    stopped = bool(res.info.get("stopped"))
    desc = {"levels": res.levels, "n_samples": res.n_samples, "seed": res.seed,
            "sampling": res.info.get("sampling"), "tta": bool(args.tta),
            "model": str(args.model), "stopped": stopped, "n_requested": args.samples,
            "axes": lay.axes, "samples_per_frame": res.info.get("samples_per_frame"),
            "frames_done": res.info.get("frames_done"), "frames": res.info.get("frames")}
    # the outputs keep the input's axes, pixel size and units (OME-TIFF when the input had any)
    meta = meta.for_axes(lay.axes)
    write_image(out / "mmse.tif", res.mmse.astype(np.float32), lay.axes, meta, desc)
    write_image(out / "variance.tif", res.variance.astype(np.float32), lay.axes, meta, desc)
    written = ["mmse.tif", "variance.tif"]
    if res.samples is not None:
        write_image(out / "samples.tif", res.samples.astype(np.float32), lay.axes, meta, desc,
                    sample_axis=True)
        written.append("samples.tif")
    levels_text = ", ".join(f"{i + 1}={m}" for i, m in enumerate(res.levels))
    counts = res.info.get("samples_per_frame") or [res.n_samples]
    if args.samples == "auto":
        lo, hi, mean = min(counts), max(counts), sum(counts) / len(counts)
        drawn = (f"{lo:g} samples per frame" if lo == hi else
                 f"{lo:g}-{hi:g} samples per frame, {mean:.1f} on average")
    else:
        drawn = f"{res.n_samples} samples"
    if stopped:
        if args.samples == "auto" and res.info.get("frames", 1) > 1:
            what = f"the {res.info['frames_done']} finished frames of {res.info['frames']} ({drawn})"
        else:
            what = f"the {res.n_samples} samples drawn"
        print(f"stopped: wrote {', '.join(written)} of {what} to {out} (levels: {levels_text})",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {', '.join(written)} to {out} ({drawn}; levels: {levels_text})")
    return EXIT_OK
