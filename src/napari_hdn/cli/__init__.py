"""The ``napari-hdn`` command line: a thin layer over the engine.

One module per command (``train``, ``predict``, ``levels``, ``noise`` for ``noise-model``,
``export`` for ``export-bmz``, ``demo``, ``bench``), each with ``add_parser(subparsers)`` that
sets ``func``; what they share (exit codes, TIFF input, progress bars, Ctrl-C, SIGTERM and
SIGHUP) is in :mod:`._common` and :mod:`._signals`. A new command is a new module listed in ``COMMANDS``.

Exit codes: 0 success, 1 a runtime problem the user can fix (bad file, bad data, training
diverged), 2 a usage error (bad option), 130 interrupted (Ctrl-C, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import sys

from . import bench, demo, export, levels, noise, predict, train
from ._common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CLIError

COMMANDS = (train, predict, levels, noise, export, demo, bench)

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "CLIError", "build_parser",
           "main"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="napari-hdn",
        description="Hierarchical DivNoising (HDN): unsupervised denoising with posterior samples, "
        "uncertainty and latent-level artefact removal.",
    )
    p.add_argument("--version", action="version", version=f"napari-hdn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``napari-hdn``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for commands that relaunch
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    import warnings

    from ..engine.errors import HDNError

    def show(message, category, *_args, **_kw) -> None:  # one line, without file and line number
        print(f"napari-hdn: warning: {message}", file=sys.stderr)

    from ._signals import interrupt_on_signals

    try:  # (SIGTERM and SIGHUP end a command as Ctrl-C does: ._signals)
        with warnings.catch_warnings(), interrupt_on_signals():
            warnings.showwarning = show
            return int(args.func(args) or 0)
    except (HDNError, CLIError) as exc:
        print(f"napari-hdn: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("napari-hdn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("napari-hdn: error: out of memory; use a smaller --tile-size or --batch-size "
              "(with --save-samples: fewer --samples, or --out OUT.zarr)",
              file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"napari-hdn: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
