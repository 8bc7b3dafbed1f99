"""What every ``napari-hdn`` command shares: exit codes, user errors, TIFF input, progress bars,
number-list options and Ctrl-C handling."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from pathlib import Path

from ..engine.errors import HDNError
from ..engine.events import FINAL_KINDS, EventTask

#: 0 success, 1 a problem the user can fix (bad file, bad data, training diverged), 2 a usage
#: error (bad option), 130 interrupted by Ctrl-C (what was finished is saved, and said so)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(HDNError):
    """A user mistake detected by the command line itself (exit code 1, like the engine's)."""


def read_tiff(path: str | Path, what: str = "input", with_axes: bool = False, lazy: bool = False,
              with_meta: bool = False):
    """The image in a TIFF file, or a CLIError saying what is wrong.

    With ``with_axes``, returns ``(array, axes)`` where ``axes`` are those the file declares
    (ImageJ or OME metadata, or photometric RGB: ``C`` for the colour samples), or None when it
    declares none; with ``with_meta`` also the file's :class:`~..engine.imageio.ImageMeta`
    (axes, pixel sizes, units). ``lazy``: a large file comes back read on demand
    (:class:`~..engine.frames.TiffPages`), for training. A channel axis of length 1 is dropped.
    """
    from ..engine.data.imageio import read_tiff as read
    from ..engine.errors import InputError

    try:
        arr, meta = read(path, what, lazy=lazy)
    except InputError as exc:
        raise CLIError(str(exc)) from None
    axes = meta.axes
    if axes and "C" in axes and arr.shape[axes.index("C")] == 1 and not hasattr(arr, "path"):
        arr = arr.squeeze(axes.index("C"))
        axes = axes.replace("C", "")
        meta = meta.for_axes(axes)
    if with_meta:
        return arr, axes, meta
    return (arr, axes) if with_axes else arr


def one_channel(arr, axes: str | None, path, what: str = "input"):
    """Refuse (CLIError) an image with several channels where a command restores one."""
    from ..engine.data.layout import layout_of
    from ..engine.errors import InputError

    try:
        lay = layout_of(arr.shape, axes)
    except InputError:
        return
    if lay.has_channels:
        raise CLIError(f"{what} {path} has {lay.channels} channels (axes {lay.axes}): this command "
                       "works on one channel; save one channel as its own TIFF first")


def resolve_axes(given: str | None, declared: str | None, path) -> str | None:
    """The axes to use: those given (``--axes``), else those the file declares. A disagreement
    is said on stderr (the given ones win)."""
    if given and declared and given.upper() != declared:
        print(f"napari-hdn: warning: {path} declares axes {declared}; using --axes {given.upper()}",
              file=sys.stderr)
    return given or declared


def check_outputs(outputs, inputs, overwrite: bool) -> None:
    """Refuse, before any work, outputs that are inputs, exist (without ``--overwrite``), repeat
    each other, or lie in folders that cannot be written; ``outputs`` is ``[(path, what)]``."""
    from ..engine.files.safeio import check_output

    seen: dict = {}
    for path, what in outputs:
        if path is None:
            continue
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise CLIError(f"the {what} and the {seen[key]} are the same file {path}: give them "
                           "different names")
        seen[key] = what
        check_output(path, inputs=[i for i in inputs if i is not None], overwrite=overwrite,
                     what=what, overwrite_hint="add --overwrite")


def check_numbers(args, **keys) -> None:
    """Check ``args`` attributes against the engine's option rules (``keys``: rule name -> attribute
    name), naming the command-line options in the messages."""
    from ..engine.options import check_option

    for rule, attr in keys.items():
        value = getattr(args, attr, None)
        if value is not None and value != "auto":
            check_option(rule, value, style="cli")


def parse_levels(text: str | None, option: str = "--deactivate") -> list[int]:
    """'1,2' -> [1, 2] (latent levels, 1 = finest)."""
    if not text:
        return []
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CLIError(f"{option} expects comma-separated level numbers like 1,2; got {text!r}") from None


def floats(text: str, what: str, n: int | None = None) -> list[float]:
    """An argparse type: comma-separated numbers (exactly ``n`` of them when given)."""
    parts = text.replace(" ", "").split(",")
    try:
        vals = [float(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and abs(v) <= 1e18 for v in vals):
        raise argparse.ArgumentTypeError(f"{what}: expected finite numbers of at most 1e18 in size, "
                                         f"got {text!r}")
    if not vals or (n is not None and len(vals) != n):
        raise argparse.ArgumentTypeError(
            f"{what}: expected {n if n else 'one or more'} comma-separated numbers, got {text!r}"
        )
    return vals


def pydantic_message(exc: Exception) -> str:
    """The field errors of a pydantic ValidationError on one line."""
    from ..engine.config import validation_message

    return validation_message(exc)


class Progress:
    """Progress bars (tqdm, on stderr) drawn from the engine's ProgressEvents, one per task.

    Use an instance as the ``callbacks=`` of an engine call, and as a context manager (or call
    :meth:`close`). ``time_budget={EventTask.TRAIN: seconds}`` draws that task's bar in seconds rather than
    steps, for runs stopped by a clock: its ETA is then the time the budget leaves. A training run
    with ``time_budget_s`` set is drawn so without being told.
    """

    TASKS = {EventTask.TRAIN: ("training", "step"), EventTask.PREDICT: ("sampling", "sample"),
             EventTask.PREDICT_CHUNKS: ("predicting chunks", "chunk"),
             EventTask.NOISE_FIT: ("fitting noise model", "it"),
             EventTask.N2V: ("Noise2Void training (until it levels off)", "step"),
             EventTask.N2V_PREDICT: ("Noise2Void prediction (pseudo-clean)", "frame")}
    SHOWN = ("train_loss", "val_loss", "train_nll", "val_nll")

    def __init__(self, quiet: bool = False, time_budget: dict | None = None) -> None:
        self.quiet = quiet
        self.time_budget = dict(time_budget or {})
        self.bars: dict = {}
        self.last: dict = {}

    def __call__(self, ev) -> None:
        metrics = ev.metrics or {}
        if metrics.get("busy"):  # said with or without bars: the machine is shared
            from tqdm import tqdm

            tqdm.write(f"napari-hdn: note: {metrics['busy']}", file=sys.stderr)
        if self.quiet or ev.task not in self.TASKS:
            return
        from tqdm import tqdm

        if ev.task not in self.time_budget and metrics.get("time_budget_s"):
            self.time_budget[ev.task] = metrics["time_budget_s"]  # a run with a time budget
        budget = self.time_budget.get(ev.task)
        bar = self.bars.get(ev.task)
        channel = metrics.get("channel")
        if bar is not None and channel is not None and self.last.get((ev.task, "channel")) != channel:
            bar.close()  # the next channel's training: a bar of its own
            bar = None
            self.last[ev.task] = {}
        if bar is None:
            desc, unit = self.TASKS[ev.task]
            unit = metrics.get("unit", unit)
            if channel is not None:
                self.last[(ev.task, "channel")] = channel
                desc += f" (channel {channel + 1} of {metrics.get('channels', '?')})"
            total = budget if budget else (ev.total or None)
            bar = self.bars[ev.task] = tqdm(total=total, desc=desc, unit="s" if budget else unit,
                                            dynamic_ncols=True, file=sys.stderr)
        post = self.last.setdefault(ev.task, {})
        post.update({k: f"{ev.metrics[k]:.4f}" for k in self.SHOWN if ev.metrics.get(k) is not None})
        if metrics.get("samples_per_frame") is not None and metrics.get("unit") != "sample":
            post["samples/frame"] = f"{metrics['samples_per_frame']:.1f}"
        if budget:
            spent = metrics.get("train_seconds", ev.elapsed)  # training time, if reported
            bar.n = min(round(spent, 1), budget)
            post["step"] = str(ev.step)
        else:
            if ev.total and bar.total != ev.total:
                bar.total = ev.total
            bar.n = ev.step
        if post:
            bar.set_postfix(post, refresh=False)
        if ev.kind in FINAL_KINDS:
            if not budget:
                bar.total = ev.step or bar.total
            if ev.task == EventTask.N2V and metrics.get("stop_reason"):
                post["ended"] = str(metrics["stop_reason"]).replace("_", " ")
                bar.set_postfix(post, refresh=False)
            bar.refresh()
            bar.close()
        else:
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SigintStop:
    """Within this block the first Ctrl-C, SIGTERM (a cluster scheduler ending the job, ``kill``) or
    SIGHUP (the terminal closed) asks the engine to stop through ``flag`` (what is done so far is
    kept and saved, and the command exits with 130 as after Ctrl-C); a second one aborts with
    KeyboardInterrupt. A SIGTERM or SIGHUP repeated within a second is the same request delivered
    twice (see :mod:`._signals`). ``on_signal(signum)``, when given, is called at the first one
    (a launcher passes the stop on to the processes it started)."""

    def __init__(self, flag, what="stopping: what is done so far will be saved",
                 on_signal=None) -> None:
        # ``what``: the message, or a callable giving it (for work whose stop means different
        # things in different phases)
        self.flag, self.what, self.old = flag, what, {}
        self.on_signal, self.first = on_signal, None

    def __enter__(self) -> SigintStop:
        from ._signals import install

        if threading.current_thread() is threading.main_thread():  # signals reach only it
            self.old = install(self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        import time

        from ._signals import DUPLICATE_S, say, signal_name

        now = time.monotonic()
        if self.flag.is_set():
            if signum != signal.SIGINT and self.first is not None \
                    and now - self.first < DUPLICATE_S:
                return
            raise KeyboardInterrupt
        self.first = now
        what = self.what() if callable(self.what) else self.what
        again = ("Ctrl-C again to abort" if signum == signal.SIGINT else
                 f"{signal_name(signum)} received; Ctrl-C or another signal aborts")
        say(f"\n{what} ({again})")
        self.flag.set()
        if self.on_signal is not None:
            self.on_signal(signum)

    def __exit__(self, *exc) -> None:
        from ._signals import restore

        restore(self.old)
        self.old = {}
