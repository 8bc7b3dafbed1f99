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

from ..engine.events import EventTask
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
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

    TEXT = {EventTask.N2V: "stopping Noise2Void: the pseudo-clean image will be predicted with what it has "
                   "learnt and the noise model fitted (Ctrl-C during the fit ends the fit)",
            EventTask.NOISE_FIT: "stopping the fit: the best fit so far will be saved"}

    def __init__(self, progress) -> None:
        self.progress, self.task = progress, None

    def __call__(self, ev) -> None:
        self.task = ev.task
        self.progress(ev)

    def stop_text(self) -> str:
        return self.TEXT.get(self.task, "stopping: the best fit so far will be saved")


def cmd_fit(args) -> int:
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

    from ..engine.files.locks import check_unlocked, output_locks

    out = Path(args.out)
    fig_path = None
    if not args.no_figure:
        fig_path = Path(args.figure) if args.figure else out.with_suffix(".diagnostics.png")
    wait = "wait for it to finish or choose another"
    outputs = [(out, "noise-model file (--out)", f"{wait} --out"),
               (fig_path, "diagnostics figure", f"{wait} --figure (or --no-figure)"),
               (args.save_pseudo_clean, "pseudo-clean image (--save-pseudo-clean)",
                f"{wait} --save-pseudo-clean")]

    def check() -> None:
        check_outputs([(path, what) for path, what, _ in outputs],
                      [args.calibration, args.clean, args.noisy, args.pseudo_clean], args.overwrite)

    check_unlocked(outputs)  # a fit still writing them is named as such
    check()
    with output_locks(outputs, note=lambda t: print(f"napari-hdn: note: {t}", file=sys.stderr)):
        check()  # again under the locks: an output finished meanwhile is not replaced
        return _fit_locked(args, out, fig_path)


def _fit_locked(args, out: Path, fig_path: Path | None) -> int:
    import warnings

    import numpy as np

    from ..engine.events import StopFlag
    from ..engine.files.safeio import write_tiff
    from ..engine.noise import fit_noise_model
    from ..engine.noise.channels import ChannelNoiseModels
    from ..engine.noise.pairs import NoiseFitWarning

    stop = StopFlag()
    bar = Progress(args.quiet)
    cb = _Phase(bar)
    fit_kw = dict(kind=args.kind, n_gaussians=args.gaussians, degree=args.degree,
                  min_variance=args.min_variance, method=args.method, iterations=args.iterations,
                  val_fraction=args.val_fraction, device=args.device, seed=args.seed,
                  callbacks=cb, stop_flag=stop)
    with warnings.catch_warnings(record=True) as caught, bar, SigintStop(stop, cb.stop_text):
        warnings.simplefilter("always", NoiseFitWarning)
        sources = _channel_sources(args)
        n = len(sources)
        pseudo_all: list = [None] * n
        fitted = []
        for c, (make_pairs, shape) in enumerate(sources):
            if n > 1 and not args.quiet:
                print(f"channel {c + 1} of {n}", file=sys.stderr)

            def keep(frames, c=c, shape=shape):
                pseudo_all[c] = np.asarray(frames, np.float32).reshape(shape)

            pairs = make_pairs(cb, stop, keep if args.save_pseudo_clean else None)
            fitted.append((fit_noise_model(pairs, **fit_kw), pairs))
            if stop.is_set():
                break
    for w in caught:
        if issubclass(w.category, NoiseFitWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    if len(fitted) < n:
        print(f"napari-hdn: stopped in channel {len(fitted)} of {n}: nothing was saved (a noise "
              "model is needed for every channel)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.save_pseudo_clean and all(p is not None for p in pseudo_all):
        lay = sources.layout
        write_tiff(args.save_pseudo_clean, lay.stack(pseudo_all) if n > 1 else pseudo_all[0],
                   photometric="minisblack")
    models = [m for m, _ in fitted]
    if n > 1:
        ChannelNoiseModels(models).save(out)
    else:
        models[0].save(out)
    figures = []
    if fig_path is not None:
        for c, (model, pairs) in enumerate(fitted):
            path = fig_path if n == 1 else fig_path.with_name(
                fig_path.name.replace(".png", f".channel-{c + 1}.png"))
            _save_figure(model, pairs, path)
            figures.append(str(path))
    descs = [m.describe() for m in models]
    if args.json:
        body = descs[0] if n == 1 else {"kind": "per-channel", "channels": descs}
        print(json.dumps({"file": str(out), "figure": figures[0] if n == 1 and figures else None,
                          **({"figures": figures} if n > 1 else {}), **body}))
    else:
        for c, (model, desc) in enumerate(zip(models, descs)):
            if model.kind == "gmm":
                what = f"gmm, {desc['n_gaussians']} Gaussians, degree {desc['degree']}"
            else:
                what = f"histogram, {desc['signal_bins']}x{desc['offset_bins']} bins"
            head = f"saved {out} ({what})" if n == 1 else f"channel {c + 1} of {n} ({what}):"
            print(head)
            for line in _describe_lines(desc):
                print(("  " if n > 1 else "") + line)
            if figures:
                print(f"diagnostics figure: {figures[c]}")
        if n > 1:
            print(f"saved {out} (one noise model per channel, {n} channels)")
    if any(d.get("fit", {}).get("stopped") for d in descs):
        print("fitting was interrupted: the best fit so far was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _save_figure(model, pairs, path) -> None:
    import numpy as np

    from ..engine.noise import HistogramNoiseModel, diagnostics_figure, save_figure

    n = len(pairs)  # at most 2 million of the pairs keep the figure quick
    pick = np.random.default_rng(0).choice(n, 2_000_000, replace=False) if n > 2_000_000 \
        else slice(None)
    s, x = pairs.signal[pick], pairs.observation[pick]
    hist = HistogramNoiseModel.from_pairs(s, x) if model.kind == "gmm" else None
    save_figure(diagnostics_figure(model, s, x, histogram=hist), path)


class _Sources(list):
    """``[(make_pairs(callbacks, stop, on_pseudo_clean), shape of the channel)]``, one a channel,
    with the ``layout`` of the data."""

    layout = None


def _channel_sources(args) -> _Sources:
    """How to make the pixel pairs of each channel of the data the options name."""
    from ..engine.data.layout import layout_of
    from ..engine.errors import InputError
    from ..engine.noise import bootstrap_pairs, pairs_from_calibration, pairs_from_clean

    def read(path, what):
        arr, declared = read_tiff(path, what, with_axes=True)
        axes = args.axes if (args.axes and path == main) else declared
        try:
            lay = layout_of(arr.shape, axes, what)
        except InputError:  # e.g. a calibration stack of an unusual shape: one channel
            lay = None
        return arr, lay

    main = args.calibration or args.noisy
    out = _Sources()
    if args.calibration:
        stack, lay = read(args.calibration, "calibration frames")
        for c in range(lay.channels if lay is not None and lay.has_channels else 1):
            view = lay.channel_view(stack, c) if lay is not None else stack
            out.append((lambda cb, stop, keep, v=view: pairs_from_calibration(v), view.shape))
        out.layout = lay
        return out
    noisy, lay = read(args.noisy, "noisy image")
    n = lay.channels if lay is not None and lay.has_channels else 1
    other = None
    if args.clean or args.pseudo_clean:
        what = "clean image" if args.clean else "pseudo-clean image"
        other, olay = read(args.clean or args.pseudo_clean, what)
        m = olay.channels if olay is not None and olay.has_channels else 1
        if m != n:
            raise InputError(f"the {what} has {m} channel(s) but the noisy image has {n}: give "
                             "both with the same channels")
        if args.pseudo_clean and other.shape != noisy.shape:
            raise InputError(f"--pseudo-clean has shape {other.shape} but --noisy has "
                             f"{noisy.shape}: they must match pixel for pixel")
    for c in range(n):
        x = lay.channel_view(noisy, c) if n > 1 else noisy
        o = None if other is None else (olay.channel_view(other, c) if n > 1 else other)
        if args.clean:
            out.append((lambda cb, stop, keep, x=x, o=o: pairs_from_clean(o, x), x.shape))
        else:
            out.append((lambda cb, stop, keep, x=x, o=o: bootstrap_pairs(
                x, o, clip_percentiles=args.clip_percentiles, n2v=_n2v_options(args),
                device=args.device, seed=args.seed, callbacks=cb, stop_flag=stop,
                on_pseudo_clean=keep), x.shape))
    out.layout = lay
    return out


# -- describe ------------------------------------------------------------------------------------
def cmd_describe(args) -> int:
    from ..engine.errors import ModelFileError
    from ..engine.noise import load_noise_model
    from ..engine.noise.channels import ChannelNoiseModels
    from ..engine.noise.diagnostics import check_noise_model

    if args.figure:
        check_outputs([(args.figure, "figure (--figure)")], [args.file], args.overwrite)
    loaded = load_noise_model(args.file)
    models = list(loaded) if isinstance(loaded, ChannelNoiseModels) else [loaded]
    for c, model in enumerate(models):  # one that gives NaN is said to be broken, not described
        where = f" (channel {c + 1} of {len(models)})" if len(models) > 1 else ""
        check_noise_model(model, what=f"{args.file}{where}", error=ModelFileError)
    if isinstance(loaded, ChannelNoiseModels):
        if args.figure:
            raise CLIError(f"{args.file} holds {len(loaded)} noise models, one per channel: "
                           "--figure draws one model; the fit wrote a figure per channel")
        rows = [_describe_one(args, m, quiet=args.json, title=f"channel {c + 1} of {len(loaded)}")
                for c, m in enumerate(loaded)]
        if args.json:
            print(json.dumps({"file": str(args.file), "kind": "per-channel", "channels": rows}))
        return EXIT_OK
    row = _describe_one(args, loaded, quiet=args.json)
    if args.json:
        print(json.dumps({"file": str(args.file), **row}))
    return EXIT_OK


def _describe_one(args, model, quiet: bool, title: str | None = None) -> dict:
    """Print (unless ``quiet``) and return the description of one noise model."""
    import numpy as np
    import torch

    from ..engine.noise import diagnostics_figure, save_figure

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
    if quiet:
        return {"model": desc, "levels": rows}
    print(f"{args.file}: {model!r}" if title is None else f"{args.file}, {title}: {model!r}")
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
    return {"model": desc, "levels": rows}


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
    d.add_argument("--axes", metavar="AXES",
                   help="axes of the noisy image or calibration stack, e.g. CYX or TCYX (default: "
                   "the file's, else guessed; (Y, X, 3) is RGB): with a channel axis C, one noise "
                   "model is fitted per channel and saved together")
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
