"""``napari-hdn train``: train an HDN on a noisy TIFF (a preset, with single fields overridden)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from ..engine.training.presets import DEFAULT_PRESET, PRESETS
from ..engine.training.priors import INIT_CHOICES
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    CLIError,
    Progress,
    SigintStop,
    check_numbers,
    check_outputs,
    one_channel,
    parse_levels,
    pydantic_message,
    read_tiff,
    resolve_axes,
)

ARCH_OPTIONS = ("levels", "z_dim", "filters", "blocks")
TRAINING_OPTIONS = ("patch_size", "batch_size", "max_steps", "val_fraction", "device", "seed", "lr",
                    "steps_per_epoch", "grad_clip", "threads")


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train an HDN on a noisy image or stack",
                       description="Train an HDN on noisy data only (no clean images needed). The "
                       "model size and training settings come from a preset (--preset); the "
                       "options below override single values of it.")
    t.add_argument("noisy", help="noisy TIFF: YX, a stack of frames (TYX/SYX/ZYX), with channels "
                   "(CYX, TCYX; RGB) one model per channel; a large file is read patch by patch")
    t.add_argument("--out", required=True, help="model file to write (e.g. model.hdn)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace --out (and the checkpoints of an earlier run) if they exist")
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
    p = t.add_argument_group("preset")
    lines = "; ".join(f"'{name}': {pr.description}" for name, pr in PRESETS.items())
    p.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                   help=f"architecture and training settings (default '{DEFAULT_PRESET}'; with "
                   f"--resume: the checkpoint's). {lines}")
    a = t.add_argument_group("architecture (default: the preset's)")
    a.add_argument("--levels", type=int, help="number of latent levels L (use 3 for tiny images)")
    a.add_argument("--z-dim", type=int, help="latent channels per level")
    a.add_argument("--filters", type=int, help="feature channels of every block")
    a.add_argument("--blocks", type=int, help="residual blocks per level")
    a.add_argument("--deactivate", metavar="LEVELS",
                   help="train with these levels (e.g. 1,2) deactivated, as the paper's HDN_3-6")
    o = t.add_argument_group("training (default: the preset's)")
    o.add_argument("--axes", help="axes of the input, e.g. YX, TYX, ZYX, CYX, TCYX, YXC (default: "
                   "the file's, else guessed)")
    o.add_argument("--patch-size", type=int, help="square training patch side")
    o.add_argument("--batch-size", type=int, help="patches per step")
    o.add_argument("--max-steps", type=int, help="optimizer steps")
    o.add_argument("--minutes", type=float, help="stop after this many minutes of training (a time "
                   "budget; validation is not counted); the progress bar then counts time")
    o.add_argument("--steps-per-epoch", type=int, help="steps between validations (default: auto)")
    o.add_argument("--val-fraction", type=float, help="fraction of data held out (default 0.1)")
    o.add_argument("--lr", type=float, help="Adamax learning rate")
    o.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    o.add_argument("--device", help="auto (default), cpu, cuda or mps")
    o.add_argument("--threads", type=int, help="CPU threads (default: all cores, fewer while "
                   "another job keeps them busy; a number fixes the count and makes a seeded CPU "
                   "run repeatable bit for bit)")
    o.add_argument("--seed", type=int, help="random seed (default 0; same seed, same CPU run)")
    o.add_argument("--init", metavar="WHERE",
                   help="where a new run starts: 'prior' (the network pretrained on other images "
                   "that ships with napari-hdn; the 'fast CPU' preset's default, for its sizes), "
                   "'scratch', or a .hdn model of the same sizes trained earlier on similar data. "
                   "Only weights are taken; the noise model is this run's. Architecture options "
                   "that change the sizes start from scratch unless --init is given")
    o.add_argument("--checkpoint-dir", help="where best.hdn/last.hdn go (default: OUT.checkpoints)")
    o.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (e.g. last.hdn; "
                   "with channels: the checkpoint folder of the interrupted run)")
    o.add_argument("--fine-tune", metavar="MODEL",
                   help="start from this trained model and train it on with the levels of "
                   "--deactivate withheld from the image (the paper's recipe for line artefacts, "
                   "warm-started: a few hundred --max-steps instead of a new training; default "
                   "300 steps at lr 1e-3). See `napari-hdn levels` for which levels")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--ddp", type=int, metavar="N",
                   help="train data-parallel in N processes (one per GPU; gloo on CPUs) launched by "
                   "torchrun: the batch is split over them, rank 0 validates and writes checkpoints "
                   "(the same as `torchrun --nproc-per-node N -m napari_hdn.cli train ...`)")
    t.set_defaults(func=run)


def noise_model_from_args(args):
    from ..engine.noise import GaussianNoiseModel, PoissonGaussianNoiseModel, load_noise_model

    given = [args.noise_model is not None, args.gaussian_sigma is not None,
             args.poisson_gain is not None]
    if sum(given) > 1:
        raise CLIError("give only one of --noise-model, --gaussian-sigma, --poisson-gain")
    if args.noise_model:
        from ..engine.noise.channels import ChannelNoiseModels
        from ..engine.noise.diagnostics import check_noise_model

        loaded = load_noise_model(args.noise_model)
        models = list(loaded) if isinstance(loaded, ChannelNoiseModels) else [loaded]
        for c, m in enumerate(models):  # broken numbers are said now, naming the file
            where = f" (channel {c + 1} of {len(models)})" if len(models) > 1 else ""
            check_noise_model(m, what=f"the noise model {args.noise_model}{where}")
        return loaded
    if args.gaussian_sigma is not None:
        return GaussianNoiseModel(args.gaussian_sigma)
    if args.poisson_gain is not None:
        return PoissonGaussianNoiseModel(args.poisson_gain, args.read_noise, args.offset)
    return None


def configs_from_args(args):
    """(model config or None, training config or None, training overrides) for the Trainer.

    A new run takes the preset with the given options on top. A resumed run keeps the checkpoint's
    architecture, and its training settings unless --preset is given; options still override.
    """
    from ..engine.training.presets import get_preset
    from ..engine.training.priors import bundled_prior_for

    arch = {k: getattr(args, k) for k in ARCH_OPTIONS if getattr(args, k) is not None}
    if args.deactivate:
        arch["deactivated_levels"] = parse_levels(args.deactivate)
    explicit = {k: getattr(args, k) for k in TRAINING_OPTIONS if getattr(args, k) is not None}
    if args.minutes is not None:
        explicit["time_budget_s"] = args.minutes * 60
    preset = get_preset(args.preset or DEFAULT_PRESET)
    if args.init is not None:
        explicit["init"] = args.init
    try:
        if args.resume:
            if arch:
                raise CLIError("leave the architecture options out when resuming: the checkpoint's "
                               "architecture is used")
            if args.init is not None:
                raise CLIError("--init chooses where a new run starts; a resumed run continues "
                               "from its checkpoint: leave --init out with --resume")
            if args.preset is None:  # the checkpoint's settings, with the options on top
                preset.training_config(**explicit)  # validate the options now
                return None, None, explicit
            return None, preset.training_config(**explicit), {}
        mcfg, tcfg = preset.model_config(**arch), preset.training_config(**explicit)
        if args.init is None and tcfg.init == "prior" and bundled_prior_for(mcfg) is None:
            print("note: no bundled prior fits these sizes; training from scratch (--init)",
                  file=sys.stderr)
            tcfg = preset.training_config(**{**explicit, "init": "scratch"})
        return mcfg, tcfg, {}
    except ValueError as exc:
        raise CLIError(f"invalid option: {pydantic_message(exc)}") from None


NUMBERS = dict(sigma="gaussian_sigma", gain="poisson_gain", read_noise="read_noise",
               offset="offset", minutes="minutes", max_steps="max_steps", patch_size="patch_size",
               batch_size="batch_size", lr="lr", grad_clip="grad_clip", val_fraction="val_fraction",
               steps_per_epoch="steps_per_epoch", threads="threads", seed="seed")


def check_destinations(args, out: Path, ckdir: Path) -> None:
    """Before any work: --out is no input, is new (or --overwrite), and can be written; the
    checkpoint folder can be written and holds no earlier run's checkpoints (unless resumed from
    there, or --overwrite)."""
    from ..engine.files.safeio import check_folder, check_input_file

    if args.resume and not Path(args.resume).is_dir():  # a checkpoint file: no FIFO, no loop
        check_input_file(args.resume, "checkpoint (--resume)", "napari-hdn model file", CLIError)
    init = getattr(args, "init", None)
    inputs = [args.noisy, args.noise_model, args.resume, init if init not in INIT_CHOICES else None]
    check_outputs([(out, "model file (--out)")], inputs, args.overwrite)
    if ckdir.exists() and not ckdir.is_dir():
        raise CLIError(f"the checkpoint folder {ckdir} is a file: give --checkpoint-dir a folder")
    check_folder(ckdir, "checkpoints")
    check_inputs_outside_checkpoints(inputs, args.resume, ckdir)
    resuming_here = args.resume and Path(args.resume).resolve().parent == ckdir.resolve()
    old = [n for n in ("last.hdn", "best.hdn") if (ckdir / n).exists()]
    old += sorted(p.name for p in ckdir.glob("channel-*") if p.is_dir()) if ckdir.is_dir() else []
    resuming_here = resuming_here or (args.resume and Path(args.resume).resolve() == ckdir.resolve())
    if old and not (args.overwrite or resuming_here):
        go_on = (f", or continue that run with --resume {ckdir / 'last.hdn'}"
                 if (ckdir / "last.hdn").is_file() else "")
        raise CLIError(f"the checkpoint folder {ckdir} holds checkpoints of an earlier run "
                       f"({', '.join(old)}): add --overwrite to replace them, or give another "
                       f"--checkpoint-dir{go_on}")
    check_checkpoint_collisions(out, ckdir)


#: what training writes in its checkpoint folder (a folder per channel, channel-1, ..., too)
CHECKPOINT_FILES = ("best.hdn", "last.hdn", "noise-models.hdnoise")


def check_inputs_outside_checkpoints(inputs, resume, ckdir: Path) -> None:
    """Before any work: no input (but the checkpoint being resumed) is a file that training writes
    in the checkpoint folder, whatever --overwrite says: it would be replaced by a checkpoint."""
    ck = ckdir.expanduser().resolve()
    for i in inputs:
        if i is None or i == resume:
            continue
        try:
            r = Path(i).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if ck in r.parents:
            first = r.relative_to(ck).parts[0]
            if first in CHECKPOINT_FILES or first.startswith("channel-"):
                raise CLIError(f"the input {i} is where training writes its checkpoint {first} "
                               f"(the checkpoint folder {ckdir}): it would be replaced; give "
                               "--checkpoint-dir another folder, or move the input")


def check_checkpoint_collisions(out: Path, ckdir: Path) -> None:
    """Before any work: --out is neither the checkpoint folder nor one of the files training
    writes in it, and nothing in the way of those files is a folder (each would be found only at
    the first validation, or after the whole training)."""
    o, c = out.expanduser().resolve(), ckdir.expanduser().resolve()
    if o == c:
        raise CLIError(f"--out {out} is also the checkpoint folder: training would write its "
                       "checkpoints into a folder of that name and then find no room for the "
                       "model; give --checkpoint-dir another folder or --out another name")
    if c in o.parents:
        inner = o.relative_to(c).parts
        if inner[0] in CHECKPOINT_FILES or inner[0].startswith("channel-"):
            raise CLIError(f"--out {out} is inside the checkpoint folder {ckdir}, where training "
                           f"writes its own {inner[0]}: give --out another name or place, or "
                           "another --checkpoint-dir")
    for name in CHECKPOINT_FILES[:2]:
        if (ckdir / name).is_dir():
            raise CLIError(f"{ckdir / name} is a folder where training writes its checkpoint "
                           f"{name}: move it away or give another --checkpoint-dir")


def _note(text: str) -> None:
    print(f"napari-hdn: note: {text}", file=sys.stderr)


def channels_resume_folder(resume) -> Path | None:
    """The checkpoint folder a multi-channel run resumes from (and writes into), from --resume:
    the folder itself, one of its channel-K folders or their last.hdn; None for a file of a run
    of one channel."""
    r = Path(resume)
    r = r.parent if r.name == "last.hdn" and r.parent.name.startswith("channel-") else r
    r = r.parent if r.name.startswith("channel-") else r
    return r if r.is_dir() else None


def outputs_of(args, out: Path, ckdir: Path) -> list:
    """``[(path, what, hint)]`` of what a training run writes, for the output locks."""
    wait = "wait for it to finish or choose another"
    outs = [(out, "model file (--out)", f"{wait} --out"),
            (ckdir, "checkpoint folder", f"{wait} --checkpoint-dir")]
    folder = channels_resume_folder(args.resume) if getattr(args, "resume", None) else None
    if folder is not None:  # a run of channels writes into the folder it resumes
        outs.append((folder, "checkpoint folder being resumed", f"{wait} checkpoint folder"))
    return outs


@contextlib.contextmanager
def guarded(args, out: Path, ckdir: Path, lock: bool = True):
    """The destination checks, and within the block the locks on every output: a run still
    writing one is refused at once, by name (before the checks, which would take its files for an
    earlier run's); the checks run again once the locks are held (an output finished meanwhile)."""
    from ..engine.files.locks import check_unlocked, output_locks

    outputs = outputs_of(args, out, ckdir)
    if lock:
        check_unlocked(outputs)
    check_destinations(args, out, ckdir)
    if not lock:
        yield
        return
    with output_locks(outputs, note=_note):
        check_destinations(args, out, ckdir)
        yield


def check_resume(args) -> None:
    """Before any work: a resume whose settings would train nothing (--max-steps at or below the
    checkpoint's step, a --minutes budget it has spent) is refused, naming the option."""
    from ..engine.training.checkpoints import check_steps_left, checkpoint_state, resumed_training_config

    if not args.resume:
        return
    ck = checkpoint_state(args.resume)
    if not ck:  # a plain model file, a folder of channels, or unreadable (said when it is read)
        return
    _, tcfg, overrides = configs_from_args(args)
    try:
        tc = resumed_training_config(ck, tcfg, overrides)
    except ValueError:  # settings the checkpoint's run cannot take: the Trainer says which
        return
    check_steps_left(ck, tc, args.resume, steps_given=args.max_steps is not None,
                     budget_given=args.minutes is not None, style="cli")


FINE_TUNE_STEPS = 300


def fine_tune_options(args) -> tuple[list[int], dict]:
    """(levels to withhold, training options) of ``--fine-tune``; usage errors before any work."""
    if args.resume:
        raise CLIError("--fine-tune starts a new run from a trained model; --resume continues an "
                       "interrupted one: give one of them")
    if (args.noise_model or args.gaussian_sigma is not None or args.poisson_gain is not None
            or args.preset or args.init is not None
            or any(getattr(args, k) is not None for k in ARCH_OPTIONS)):
        raise CLIError("--fine-tune keeps the model's architecture, weights and noise model: leave "
                       "--preset, --init, the architecture options and the noise-model options out")
    if not args.deactivate:
        raise CLIError("--fine-tune needs --deactivate LEVELS: the levels to withhold from the "
                       "image (e.g. 1 or 1,2; `napari-hdn levels MODEL NOISY` suggests them)")
    opts = {k: getattr(args, k) for k in TRAINING_OPTIONS if getattr(args, k) is not None}
    opts["steps"] = opts.pop("max_steps", FINE_TUNE_STEPS)
    if args.minutes is not None:
        opts["time_budget_s"] = args.minutes * 60
    return parse_levels(args.deactivate), opts


def run_torchrun(args, ckdir: Path) -> int:
    """``--ddp N``: this same command in N processes under torchrun; a failure is said in one line
    that names the last checkpoint."""
    import subprocess
    import time

    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--ddp":
            skip = True
            continue
        if not a.startswith("--ddp="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.ddp}", "-m", "napari_hdn.cli", *rest]
    from ..engine import StopFlag
    from ..engine.files.locks import environment_for_children

    # torchrun in a session of its own: a stop signal (Ctrl-C at the terminal, SIGTERM to this
    # process) reaches this launcher alone, which passes it on once; torchrun passes it to the
    # ranks, which stop after the step they are in, and rank 0 saves the best model so far. The
    # ranks write under this process's output locks (environment_for_children).
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=environment_for_children(), start_new_session=True)
    stop = StopFlag()

    def pass_on(signum) -> None:
        with contextlib.suppress(OSError):
            proc.send_signal(signum)

    try:
        with SigintStop(stop, f"stopping the {args.ddp} training processes after this step: the "
                        "best model so far will be saved", on_signal=pass_on):
            rc = proc.wait()
    except KeyboardInterrupt:  # a second signal: abort the whole run
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, 9)
        proc.wait()
        raise
    if rc == 0:
        return EXIT_OK
    out = Path(args.out)
    if stop.is_set() and out.exists() and out.stat().st_mtime >= t0:
        print(f"napari-hdn: the {args.ddp}-process run was stopped; its best model so far is in "
              f"{out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    last = ckdir / "last.hdn"
    kept = (f"the last checkpoint {last} is intact: continue with --resume {last}" if last.exists()
            else "no checkpoint had been written yet")
    raise CLIError(f"the {args.ddp}-process training run failed (torchrun exit code {rc}; the "
                   f"first failure is reported above); {kept}")


def run(args) -> int:
    from ..engine.training.ddp import launched_by_torchrun, world

    check_numbers(args, **NUMBERS)
    if args.ddp is not None and args.ddp < 1:
        raise CLIError("--ddp must be at least 1 (the number of training processes)")
    if args.fine_tune:
        if args.ddp:
            raise CLIError("--ddp trains a new or resumed run; it does not apply to --fine-tune")
        return run_fine_tune(args)
    if args.resume and (args.noise_model or args.gaussian_sigma is not None
                        or args.poisson_gain is not None):
        raise CLIError("a resumed run keeps the noise model of its checkpoint: leave --noise-model, "
                       "--gaussian-sigma and --poisson-gain out with --resume (or start a new run)")
    check_resume(args)
    out = Path(args.out)
    ckdir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_suffix(".checkpoints")
    if args.ddp:
        if launched_by_torchrun():
            raise CLIError("--ddp starts torchrun itself: leave it out when launching with torchrun")
        with guarded(args, out, ckdir):  # the ranks write under this launcher's locks
            return run_torchrun(args, ckdir)
    # one rank of a torchrun launch: rank 0 writes, and holds the locks (RANK is set by torchrun
    # before the process group exists)
    with guarded(args, out, ckdir, lock=world()[0] == 0):
        return _run(args, out, ckdir)


def _run(args, out: Path, ckdir: Path) -> int:
    from ..engine import OutputError, StopFlag, Trainer
    from ..engine.data.frames import frames_of
    from ..engine.data.layout import layout_of
    from ..engine.training.ddp import DDPTrainer, init_process_group, launched_by_torchrun, world

    parallel = launched_by_torchrun()
    if parallel:  # one rank of a torchrun launch
        from ..engine.device import resolve_device

        init_process_group(resolve_device(args.device or "auto"))
        Trainer = DDPTrainer  # noqa: N806 - the class this rank trains with
    rank = world()[0]
    # a large file is read on demand, patch by patch: training never holds it in memory
    images, declared, meta = read_tiff(args.noisy, "input", lazy=True, with_meta=True)
    args.axes = resolve_axes(args.axes, declared, args.noisy)
    lay = layout_of(images.shape, args.axes)
    if lay.has_channels and lay.channels == 1:  # one channel: its frames, read on demand
        images = frames_of(images, lay.frame_axes, channel=(lay.channel_pos, 0), name="input")
        args.axes = None
    elif lay.has_channels:
        if parallel:
            raise CLIError("--ddp trains one channel's model; an image with channels trains one "
                           "model per channel in one process: leave --ddp out")
        return run_channels(args, images, lay, meta, out, ckdir)
    noise = noise_model_from_args(args)
    if noise is None and not args.resume:
        raise CLIError(
            "a noise model is needed: --noise-model FILE (see `napari-hdn noise-model fit`), "
            "--gaussian-sigma S, or --poisson-gain G --read-noise R"
        )
    mcfg, tcfg, overrides = configs_from_args(args)
    stop = StopFlag()
    with Progress(args.quiet or rank != 0) as bar:
        trainer = Trainer(images, noise, axes=args.axes, model_config=mcfg, training_config=tcfg,
                          training_overrides=overrides, checkpoint_dir=ckdir, callbacks=bar,
                          resume=args.resume, stop_flag=stop)
        with SigintStop(stop, "stopping after this step: the best model so far will be saved"):
            model = trainer.run()  # a stop ends the run within one step with the best model
    if args.axes or lay.frame_axes:
        model.info["axes"] = (args.axes or lay.frame_axes).upper()
    model.info["image"] = meta.for_axes(lay.axes).to_dict()  # pixel size etc. of the data
    if rank != 0:  # rank 0 writes the model and reports
        return EXIT_INTERRUPTED if model.info.get("stopped_early") else EXIT_OK
    try:
        model.save(out)
    except OutputError as exc:
        best = ckdir / "best.hdn"
        kept = f"; the best model so far is in {best}" if best.exists() else ""
        raise CLIError(f"{exc}{kept}") from None
    info = model.info
    best = info.get("best_val_loss")
    best_text = f"{best:.4f}" if best is not None else "n/a"
    if info.get("stopped_early"):
        print(f"stopped at step {info['steps']}: the best model so far (validation loss {best_text}) "
              f"saved to {out}; checkpoints in {ckdir} (--resume {ckdir / 'last.hdn'} continues)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    began = info.get("start", {})
    start = {"prior": "from the bundled prior", "model file": f"from {began.get('file')}"}.get(
        began.get("init"), "from scratch")
    if args.resume:
        start = f"resumed from {args.resume}"
    print(f"saved {out} (steps {info['steps']} {start}, best validation loss {best_text}; "
          f"checkpoints in {ckdir})")
    return EXIT_OK


def run_channels(args, images, lay, meta, out: Path, ckdir: Path) -> int:
    """Train one HDN per channel of ``images`` (layout ``lay``) and write them as one model."""
    from ..engine import StopFlag, StopRequested
    from ..engine.training.channels import train_channels

    noise = noise_model_from_args(args)
    if noise is None and not args.resume:
        raise CLIError(
            f"a noise model is needed for the {lay.channels} channels: --noise-model FILE (one "
            "per channel from `napari-hdn noise-model fit` on this image, or one for all), "
            "--gaussian-sigma S, or --poisson-gain G --read-noise R (the same for every channel)")
    resume = None
    if args.resume:
        resume = channels_resume_folder(args.resume)
        if resume is None:
            raise CLIError(f"--resume {args.resume}: a multi-channel run resumes from its checkpoint "
                           f"folder (the --checkpoint-dir of the interrupted run, e.g. {ckdir})")
    mcfg, tcfg, overrides = configs_from_args(args)
    names = ["R", "G", "B", "A"][: lay.channels] if meta.rgb else None
    stop = StopFlag()
    with Progress(args.quiet) as bar, SigintStop(stop, "stopping after this step: the best model "
                                                 "so far will be saved"):
        try:
            model = train_channels(images, noise, axes=lay.axes, model_config=mcfg,
                                   training_config=tcfg, checkpoint_dir=ckdir, callbacks=bar,
                                   stop_flag=stop, resume=resume, training_overrides=overrides,
                                   channel_names=names)
        except StopRequested as exc:
            print(f"napari-hdn: {exc}: continue with --resume {ckdir}", file=sys.stderr)
            return EXIT_INTERRUPTED
    model.info["image"] = meta.for_axes(lay.axes).to_dict()
    model.save(out)
    steps = ", ".join(str(s) for s in model.info["steps"])
    if model.info.get("stopped_early"):
        print(f"stopped in the last channel: the best model so far saved to {out}; --resume {ckdir} "
              "continues", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"saved {out} ({lay.channels} channels, axes {lay.axes}: one HDN per channel, steps "
          f"{steps}; checkpoints in {ckdir})")
    return EXIT_OK


def run_fine_tune(args) -> int:
    levels, opts = fine_tune_options(args)
    out = Path(args.out)
    ckdir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_suffix(".checkpoints")
    args.noise_model = args.fine_tune  # an input that --out must not replace
    with guarded(args, out, ckdir):
        return _fine_tune(args, levels, opts, out, ckdir)


def _fine_tune(args, levels, opts, out: Path, ckdir: Path) -> int:
    from ..engine import InputError, ModelConfig, StopFlag, fine_tune, load_model
    from ..engine.config import validated

    model = load_model(args.fine_tune)
    try:
        validated(ModelConfig, {**model.config.model_dump(), "deactivated_levels": sorted(
            set(model.config.deactivated_levels) | set(levels))})
    except InputError as exc:
        raise CLIError(f"--deactivate {args.deactivate}: {exc}") from None
    images, declared = read_tiff(args.noisy, "input", with_axes=True)
    axes = resolve_axes(args.axes, declared, args.noisy)
    one_channel(images, axes, args.noisy)
    stop = StopFlag()
    with Progress(args.quiet) as bar, SigintStop(stop, "stopping after this step: the best model "
                                                  "so far will be saved"):
        try:
            tuned = fine_tune(model, images, levels, axes=axes, checkpoint_dir=ckdir, callbacks=bar,
                              stop_flag=stop, **opts)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"invalid option: {pydantic_message(exc)}") from None
    if axes:
        tuned.info["axes"] = axes.upper()
    tuned.save(out)
    off = ", ".join(map(str, tuned.config.deactivated_levels))
    print(f"saved {out}: {args.fine_tune} fine-tuned for {tuned.info['fine_tuned']['steps']} steps "
          f"with levels {off} withheld ({tuned.config.withheld_mode}); predict with it as with any "
          "model (those levels stay off)")
    return EXIT_INTERRUPTED if tuned.info.get("stopped_early") else EXIT_OK
