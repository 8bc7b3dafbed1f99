"""``napari-hdn levels``: what switching off each latent level removes, and the suggested setting."""

from __future__ import annotations

import json

from ._common import EXIT_OK, CLIError, check_numbers, read_tiff, resolve_axes

MODE_CHOICES = ["prior-mean", "prior-sample", "zero"]


def add_parser(sub) -> None:
    c = sub.add_parser(
        "levels", help="which latent levels carry structured noise (suggests --deactivate)",
        description="Switch off the bottom 1, 2, ... latent levels in turn on a crop of the image and "
        "say what each removes: its energy (in units of the pixel noise variance), whether it "
        "looks like an artefact (independent of the image) or like real detail (where the image "
        "has structure), and the change of the data's log-likelihood. Prints the suggested "
        "setting and the predict command that uses it.")
    c.add_argument("model", help="model file")
    c.add_argument("noisy", help="noisy TIFF (YX or frames; the middle frame is analysed)")
    add_options(c)
    c.add_argument("--axes", help="axes of the input, e.g. YX, TYX, CYX (default: the file's, "
                   "else guessed)")
    c.add_argument("--channel", type=int, metavar="K",
                   help="with a multi-channel model: the channel to analyse (0 = the first)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=run)


def pick_channel(args, model, image, axes):
    """(model, image, axes) of one channel: ``--channel`` of a multi-channel model and image."""
    from ..engine.data.layout import layout_of
    from ..engine.network.multichannel import MultiChannelModel, check_channels

    lay = layout_of(image.shape, axes)
    check_channels(model, lay, str(args.noisy))
    if not isinstance(model, MultiChannelModel):
        if getattr(args, "channel", None) is not None:
            raise CLIError("--channel chooses a channel of a multi-channel model; this model has one")
        return model, image, axes
    if args.channel is None:
        raise CLIError(f"the model has {model.channels} channels: choose the one to analyse with "
                       f"--channel K (0..{model.channels - 1})")
    return model.channel(args.channel), lay.channel_view(image, args.channel), lay.frame_axes


def add_options(c, prefix: str = "") -> None:
    """Options shared with ``predict --suggest-levels``."""
    c.add_argument(f"--{prefix}samples", dest="level_samples", type=int, default=8,
                   help="posterior samples per setting (default 8)")
    c.add_argument(f"--{prefix}crop", dest="level_crop", type=int, default=256,
                   help="side of the centre crop analysed (default 256)")
    c.add_argument(f"--{prefix}frame", dest="level_frame", type=int,
                   help="frame of a stack to analyse (default: the middle one)")
    if not prefix:
        c.add_argument("--mode", dest="deactivate_mode", choices=MODE_CHOICES,
                       default="prior-mean", help="how levels are switched off (default "
                       "prior-mean: z is the prior's mean given the levels above; prior-sample "
                       "draws it from that prior)")
        c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        c.add_argument("--device", help="auto (default), cpu, cuda or mps")


def describe(args, model, image, axes):
    """The :class:`LevelReport` of ``image`` (frames as given by ``axes``)."""
    from ..engine import describe_levels
    from ..engine.data.arrays import check_axes

    check_numbers(args, n_samples="level_samples", crop="level_crop")
    if args.level_frame is not None and args.level_frame < 0:
        raise CLIError(f"--frame must be 0 or more, not {args.level_frame}")
    check_axes(axes, image.shape)
    return describe_levels(model, image, n_samples=args.level_samples, mode=args.deactivate_mode,
                           seed=args.seed, crop=args.level_crop, frame=args.level_frame,
                           device=args.device)


def run(args) -> int:
    from ..engine import load_model

    model = load_model(args.model)
    image, declared = read_tiff(args.noisy, "input", with_axes=True)
    axes = resolve_axes(args.axes, declared, args.noisy)
    model, image, axes = pick_channel(args, model, image, axes)
    rep = describe(args, model, image, axes)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))
        return EXIT_OK
    y0, x0, h, w = rep.crop
    print(f"{args.noisy}: crop {h}x{w} at ({y0}, {x0}), {rep.n_samples} samples per setting, "
          f"levels switched off as {rep.mode}")
    for line in rep.lines():
        print("  " + line)
    off = rep.levels_off
    if off:
        print(f"predict with: napari-hdn predict {args.model} {args.noisy} --out-dir OUT "
              f"--deactivate {','.join(map(str, off))} --deactivate-mode {rep.mode}")
        print(f"or fine-tune first: napari-hdn train {args.noisy} --fine-tune {args.model} "
              f"--deactivate {','.join(map(str, off))} --out tuned.hdn")
    return EXIT_OK
