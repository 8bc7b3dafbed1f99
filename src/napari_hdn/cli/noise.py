"""``napari-hdn noise-model fit`` and ``napari-hdn noise-model describe``.

A thin layer over ``napari_hdn.engine.noise``: read TIFFs, build pixel pairs, fit, save the model
and a diagnostics figure, print the verdict. Errors the user can fix are raised as ``HDNError``
(``InputError``, ``ModelFileError``), which the main CLI prints without a traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Progress,
    SigintStop,
    check_numbers,
    check_outputs,
    floats,
    read_tiff,
)

FIT_EPILOG = """\
data (choose one):
  --calibration FRAMES.tif            many noisy frames of a static sample (best; 50-100 frames)
  --clean CLEAN.tif --noisy NOISY.tif a clean image and one or more noisy images of it
  --noisy NOISY.tif --pseudo-clean P  noisy data and a denoised version of it (any denoiser)
  --noisy NOISY.tif [--bootstrap n2v] noisy data only: a built-in Noise2Void network makes the
                                      pseudo-clean image (the default when only --noisy is given)

examples:
  napari-hdn noise-model fit --calibration frames.tif --out camera.hdnoise
  napari-hdn noise-model fit --noisy data.tif --bootstrap n2v --out boot.hdnoise
  napari-hdn noise-model describe camera.hdnoise --signal 100,500,1000
"""


def _percentiles(text: str):
    if text.lower() in ("none", "off"):
        return None
    return tuple(floats(text, "--clip-percentiles", 2))


def _signals(text: str):
    return floats(text, "--signal")


def _describe_lines(desc: dict) -> list[str]:
    lines = []
    lo, hi = desc.get("signal_range", [None, None]) or [None, None]
    if lo is not None:
        lines.append(f"fitted signal range: {lo:.6g} .. {hi:.6g}")
    if desc.get("n_pairs") is not None:
        lines.append(f"pairs: {desc['n_pairs']:,} from {desc.get('source', '?')} "
                     f"({desc.get('n_heldout', 0):,} held out)")
    if desc.get("heldout_nll") is not None:
        h = desc.get("heldout_nll_histogram")
        extra = f" (histogram model: {h:.4f})" if h is not None else ""
        lines.append(f"held-out NLL: {desc['heldout_nll']:.4f} nats/pixel{extra} "
                     f"[on {desc.get('nll_on', 'held-out pairs')}; lower is better]")
    if desc.get("verdict"):
        lines.append(f"verdict: {desc['verdict']}")
        lines += [f"  - {r}" for r in desc.get("reasons", [])]
        lines += [f"  ok: {c}" for c in desc.get("checks", [])]
    return lines


# -- fit -----------------------------------------------------------------------------------------
def _n2v_options(args) -> dict:
    kw = {}
    if args.n2v_steps:
        kw["max_steps"] = args.n2v_steps
    if args.n2v_minutes:
        kw["time_budget_s"] = 60.0 * args.n2v_minutes
    return kw


class _Phase:
    """Follows the progress events, so that Ctrl-C can say what it stops in each phase."""

    TEXT = {"n2v": "stopping Noise2Void: the pseudo-clean image will be predicted with what it has "
                   "learnt and the noise model fitted (Ctrl-C during the fit ends the fit)",
            "noise-fit": "stopping the fit: the best fit so far will be saved"}

    def __init__(self, progress) -> None:
        self.progress, self.task = progress, ""

    def __call__(self, ev) -> None:
        self.task = ev.task
        self.progress(ev)

    def stop_text(self) -> str:
        return self.TEXT.get(self.task, "stopping: the best fit so far will be saved")


def cmd_fit(args) -> int:
    import warnings

    import numpy as np

    from ..engine.errors import InputError
    from ..engine.events import StopFlag
    from ..engine.noise import (
        HistogramNoiseModel,
        bootstrap_pairs,
        diagnostics_figure,
        fit_noise_model,
        pairs_from_calibration,
        pairs_from_clean,
        save_figure,
    )
    from ..engine.noise.pairs import NoiseFitWarning
    from ..engine.safeio import write_tiff

    p = args._parser
    if args.calibration and (args.clean or args.noisy or args.pseudo_clean or args.bootstrap):
        p.error("--calibration cannot be combined with --clean, --noisy, --pseudo-clean or --bootstrap")
    if args.clean and not args.noisy:
        p.error("--clean needs --noisy (the noisy image(s) of the same field of view)")
    if args.clean and (args.pseudo_clean or args.bootstrap):
        p.error("--clean cannot be combined with --pseudo-clean or --bootstrap")
    if args.pseudo_clean and args.bootstrap:
        p.error("give either --pseudo-clean or --bootstrap n2v, not both")
    if not (args.calibration or args.noisy):
        p.error("give the data: --calibration FRAMES.tif, --clean C.tif --noisy N.tif, or --noisy N.tif")
    check_numbers(args, n_gaussians="gaussians", degree="degree", min_variance="min_variance",
                  iterations="iterations", fit_val_fraction="val_fraction", n2v_steps="n2v_steps",
                  n2v_minutes="n2v_minutes", seed="seed")

    out = Path(args.out)
    fig_path = None
    if not args.no_figure:
        fig_path = Path(args.figure) if args.figure else out.with_suffix(".diagnostics.png")
    check_outputs([(out, "noise-model file (--out)"), (fig_path, "diagnostics figure"),
                   (args.save_pseudo_clean, "pseudo-clean image (--save-pseudo-clean)")],
                  [args.calibration, args.clean, args.noisy, args.pseudo_clean], args.overwrite)
    stop = StopFlag()
    bar = Progress(args.quiet)
    cb = _Phase(bar)
    fit_kw = dict(kind=args.kind, n_gaussians=args.gaussians, degree=args.degree,
                  min_variance=args.min_variance, method=args.method, iterations=args.iterations,
                  val_fraction=args.val_fraction, device=args.device, seed=args.seed,
                  callbacks=cb, stop_flag=stop)
    with warnings.catch_warnings(record=True) as caught, bar, SigintStop(stop, cb.stop_text):
        warnings.simplefilter("always", NoiseFitWarning)
        if args.calibration:
            pairs = pairs_from_calibration(read_tiff(args.calibration, "calibration frames"))
        elif args.clean:
            pairs = pairs_from_clean(read_tiff(args.clean, "clean image"),
                                     read_tiff(args.noisy, "noisy image"))
        else:
            noisy = read_tiff(args.noisy, "noisy image")
            pseudo = read_tiff(args.pseudo_clean, "pseudo-clean image") if args.pseudo_clean else None
            if pseudo is not None and pseudo.shape != noisy.shape:
                raise InputError(f"--pseudo-clean has shape {pseudo.shape} but --noisy has "
                                 f"{noisy.shape}: they must match pixel for pixel")
            save = None
            if args.save_pseudo_clean:
                def save(frames):
                    write_tiff(args.save_pseudo_clean, np.asarray(frames, np.float32).reshape(
                        noisy.shape), photometric="minisblack")
            pairs = bootstrap_pairs(noisy, pseudo, clip_percentiles=args.clip_percentiles,
                                    n2v=_n2v_options(args), device=args.device, seed=args.seed,
                                    callbacks=cb, stop_flag=stop, on_pseudo_clean=save)
        model = fit_noise_model(pairs, **fit_kw)
    for w in caught:
        if issubclass(w.category, NoiseFitWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    model.save(out)
    desc = model.describe()
    if fig_path is not None:
        # at most 2 million of the pairs keep the figure quick
        n = len(pairs)
        pick = slice(None)
        if n > 2_000_000:
            pick = np.random.default_rng(0).choice(n, 2_000_000, replace=False)
        s, x = pairs.signal[pick], pairs.observation[pick]
        hist = HistogramNoiseModel.from_pairs(s, x) if model.kind == "gmm" else None
        fig = diagnostics_figure(model, s, x, histogram=hist)
        save_figure(fig, fig_path)
    if args.json:
        print(json.dumps({"file": str(out), "figure": str(fig_path) if fig_path else None, **desc}))
    else:
        if model.kind == "gmm":
            what = f"gmm, {desc['n_gaussians']} Gaussians, degree {desc['degree']}"
        else:
            what = f"histogram, {desc['signal_bins']}x{desc['offset_bins']} bins"
        print(f"saved {out} ({what})")
        for line in _describe_lines(desc):
            print(line)
        if fig_path:
            print(f"diagnostics figure: {fig_path}")
    if desc.get("fit", {}).get("stopped"):
        print("fitting was interrupted: the best fit so far was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


# -- describe ------------------------------------------------------------------------------------
def cmd_describe(args) -> int:
    import numpy as np
    import torch

    from ..engine.noise import diagnostics_figure, load_noise_model, save_figure

    if args.figure:
        check_outputs([(args.figure, "figure (--figure)")], [args.file], args.overwrite)
    model = load_noise_model(args.file)
    desc = model.describe()
    rng = getattr(model, "signal_range", None)
    if args.signal:
        levels = list(args.signal)
    elif rng is not None:
        levels = [float(v) for v in np.linspace(rng[0], rng[1], 5)]
    else:
        levels = [10.0, 100.0, 1000.0]
    with torch.no_grad():
        mean, std = model.moments(torch.tensor(levels, dtype=torch.float32))
    rows = [{"signal": s, "mean": float(m), "std": float(sd)}
            for s, m, sd in zip(levels, mean.tolist(), std.tolist())]
    if args.figure:
        save_figure(diagnostics_figure(model), args.figure)
    if args.json:
        print(json.dumps({"file": str(args.file), "model": desc, "levels": rows}))
        return EXIT_OK
    print(f"{args.file}: {model!r}")
    print(f"{'signal':>14} {'mean of x':>14} {'std of x':>12}")
    for r in rows:
        outside = ""
        if rng is not None and not rng[0] <= r["signal"] <= rng[1]:
            outside = "  (outside the fitted range: extrapolated)"
        print(f"{r['signal']:>14.6g} {r['mean']:>14.6g} {r['std']:>12.5g}{outside}")
    for line in _describe_lines(desc):
        print(line)
    if args.figure:
        print(f"figure: {args.figure}")
    return EXIT_OK


# -- parser --------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``noise-model`` (with ``fit`` and ``describe``) to an argparse ``subparsers`` object."""
    nm = subparsers.add_parser(
        "noise-model", help="fit or inspect a pixel noise model p(x | s)",
        description="Fit a noise model (GMM or histogram) from calibration frames, a clean image, "
        "or the noisy data alone (bootstrap), or describe a noise-model file.",
    )
    sub = nm.add_subparsers(dest="noise_command", metavar="ACTION")
    nm.set_defaults(func=lambda args: (nm.print_help(), EXIT_USAGE)[1])

    f = sub.add_parser(
        "fit", help="fit a noise model and write it with a diagnostics figure",
        description="Fit a noise model by maximum likelihood on (signal, observation) pixel pairs,\n"
        "save it (safetensors, for `napari-hdn train --noise-model`), write a diagnostics\n"
        "figure, and print the held-out likelihood and a verdict.",
        epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = f.add_argument_group("data")
    d.add_argument("--calibration", metavar="FRAMES.tif",
                   help="stack of noisy frames (first axis) of a static sample; the signal is their "
                   "mean (use 20 or more frames, ideally 100)")
    d.add_argument("--clean", metavar="CLEAN.tif",
                   help="clean image of the sample; needs --noisy with images of the same field")
    d.add_argument("--noisy", metavar="NOISY.tif",
                   help="noisy image(s): YX or a stack (SYX); with --clean, paired with it; alone, "
                   "for bootstrapping")
    d.add_argument("--pseudo-clean", metavar="PSEUDO.tif",
                   help="with --noisy only: a denoised version of NOISY (same shape) used as signal")
    d.add_argument("--bootstrap", choices=["n2v"],
                   help="with --noisy only: make the pseudo-clean image with the built-in Noise2Void "
                   "network (the default when neither --clean nor --pseudo-clean is given)")
    d.add_argument("--clip-percentiles", type=_percentiles, default=(0.5, 99.5), metavar="LO,HI",
                   help="bootstrap only: leave out pairs whose pseudo-clean value is outside these "
                   "percentiles (default 0.5,99.5; 'none' keeps all)")
    d.add_argument("--n2v-steps", type=int, metavar="N",
                   help="bootstrap n2v: at most N training steps of the Noise2Void network "
                   "(default: until its validation loss levels off, at most 4000; a run cut "
                   "short by this limit makes the verdict suspicious)")
    d.add_argument("--n2v-minutes", type=float, metavar="M",
                   help="bootstrap n2v: stop Noise2Void training after M minutes at the latest "
                   "(a run cut short by this limit makes the verdict suspicious)")
    d.add_argument("--save-pseudo-clean", metavar="FILE.tif",
                   help="bootstrap n2v: also write the Noise2Void prediction as a TIFF")
    o = f.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="FILE",
                   help="noise-model file to write (e.g. camera.hdnoise)")
    o.add_argument("--figure", metavar="PNG",
                   help="diagnostics figure to write (default: OUT with suffix .diagnostics.png)")
    o.add_argument("--no-figure", action="store_true", help="do not write a diagnostics figure")
    o.add_argument("--overwrite", action="store_true",
                   help="replace --out, the figure and --save-pseudo-clean if they exist")
    o.add_argument("--json", action="store_true",
                   help="print the fitted model's description as JSON instead of text")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    m = f.add_argument_group("model")
    m.add_argument("--kind", choices=["gmm", "histogram"], default="gmm",
                   help="gmm: signal-dependent Gaussian mixture (default; smooth, few parameters); "
                   "histogram: empirical 2D histogram (needs many pairs)")
    m.add_argument("--gaussians", type=int, default=3, metavar="K",
                   help="gmm: number of Gaussians in the mixture (default 3)")
    m.add_argument("--degree", type=int, default=1, metavar="D",
                   help="gmm: polynomial degree of the parameters in the signal (default 1)")
    m.add_argument("--min-variance", type=float, metavar="V",
                   help="gmm: variance floor (default: 2%% of the smallest variance of x - s "
                   "in any signal bin)")
    m.add_argument("--method", choices=["binned", "minibatch"], default="binned",
                   help="gmm optimiser: binned (default; L-BFGS on binned pairs, fast) or minibatch "
                   "(Adam on random mini-batches of pairs)")
    m.add_argument("--iterations", type=int, metavar="N",
                   help="gmm: maximum optimiser iterations (default 200 binned, 400 minibatch)")
    m.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of pairs held out for the held-out likelihood (default 0.1)")
    m.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    m.add_argument("--seed", type=int, default=0,
                   help="random seed: held-out split, mini-batches, Noise2Void (default 0)")
    f.set_defaults(func=cmd_fit, _parser=f)

    ds = sub.add_parser(
        "describe", help="print a noise model's mean and std of p(x|s), fitted range and diagnostics",
        description="For each signal level, the mean and standard deviation of p(x | s); then the "
        "signal range the model was fitted on, its held-out likelihood and verdict.",
    )
    ds.add_argument("file", help="noise-model file (from `napari-hdn noise-model fit`)")
    ds.add_argument("--signal", type=_signals, metavar="S1,S2,...",
                    help="signal levels to describe, e.g. 10,100,1000 (default: 5 levels across the "
                    "fitted range)")
    ds.add_argument("--json", action="store_true", help="print JSON instead of text")
    ds.add_argument("--figure", metavar="PNG",
                    help="also write a figure of the model (std vs signal with the data statistics "
                    "stored at fitting time, p(x|s) at a few levels)")
    ds.add_argument("--overwrite", action="store_true", help="replace --figure if it exists")
    ds.set_defaults(func=cmd_describe)
    return nm
