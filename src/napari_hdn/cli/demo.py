"""``napari-hdn demo``: the whole workflow on built-in data with known ground truth, offline."""

from __future__ import annotations

from pathlib import Path

from ..engine.events import EventTask
from ..engine.training.presets import DEFAULT_PRESET
from ._common import EXIT_OK, CLIError, Progress, check_numbers, check_outputs

OUTPUTS = ("demo.hdn", "noisy.tif", "truth.tif", "mmse.tif", "variance.tif", "samples.tif",
           "demo.png")


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="train and predict on built-in sample data (offline)",
                       description="Make a noisy fluorescence image with known ground truth, train "
                       f"the '{DEFAULT_PRESET}' preset for a few minutes, predict, and report PSNR.")
    d.add_argument("--out-dir", default="hdn-demo", help="output folder (default ./hdn-demo)")
    d.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier demo in --out-dir")
    d.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    check_numbers(args, minutes="minutes", seed="seed")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out-dir {out} is a file, not a folder")
    check_outputs([(out / n, n) for n in OUTPUTS], [], args.overwrite)

    # training stops on a clock: its bar counts seconds, so the ETA is the budget left
    with Progress(args.quiet, time_budget={EventTask.TRAIN: args.minutes * 60}) as bar:
        run_demo(Path(args.out_dir), minutes=args.minutes, seed=args.seed, device=args.device,
                 quiet=args.quiet, callbacks=bar)
    return EXIT_OK
