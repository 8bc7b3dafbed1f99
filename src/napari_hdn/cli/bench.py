"""``napari-hdn bench``: training and prediction speed on this machine."""

from __future__ import annotations

from ._common import EXIT_OK, check_outputs


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="training and prediction speed benchmark",
                       description="Time the training step and a 100-sample prediction of the "
                       "presets' networks on this machine: training steps/s, the fraction of the "
                       "machine's conv2d throughput a step achieves, prediction time and peak "
                       "memory.")
    b.add_argument("--quick", action="store_true", help="small configuration only (about a minute)")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    b.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    b.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    b.set_defaults(func=run)


def run(args) -> int:
    from ..bench import run_speed_benchmark

    check_outputs([(args.json, "figures file (--json)")], [], args.overwrite)  # before the run
    run_speed_benchmark(quick=args.quick, device=args.device, json_out=args.json)
    return EXIT_OK
