"""Progress events and cooperative stopping, shared by every long-running engine task.

Front ends (CLI progress bars, Qt widgets, notebooks) subscribe with a plain callable; the engine
never knows which. A :class:`StopFlag` is set from any thread and checked by the engine at least
once per optimisation step, so a stop takes effect within one step.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import StopRequested


class _Name(str, enum.Enum):
    """A name that is also its plain string: equal to it, printed and JSON-encoded as it."""

    def __str__(self) -> str:
        return str.__str__(self)


class EventKind(_Name):
    """What a :class:`ProgressEvent` reports."""

    START = "start"
    STEP = "step"
    #: a validation was done (training)
    EPOCH = "epoch"
    DONE = "done"
    STOPPED = "stopped"
    #: finished frames passed along with the progress (the prediction widget's live layers)
    FRAMES = "frames"


#: the kinds that end a task
FINAL_KINDS = frozenset({EventKind.DONE, EventKind.STOPPED})


class EventTask(_Name):
    """Which long-running task a :class:`ProgressEvent` comes from."""

    TRAIN = "train"
    NOISE_FIT = "noise-fit"
    N2V = "n2v"
    N2V_PREDICT = "n2v-predict"
    PREDICT = "predict"
    PREDICT_CHUNKS = "predict-chunks"


@dataclass
class ProgressEvent:
    """One report from a long-running task.

    Attributes
    ----------
    task : EventTask
        What runs (a ``str`` enum: ``ev.task == "train"`` holds as well).
    kind : EventKind
        What happened: start, step, epoch (a validation was done), done, stopped.
    step, total : int
        Progress so far and the planned total (optimizer steps, tiles, ...).
    metrics : dict
        Numbers such as ``train_loss``, ``val_loss``, ``kl_per_level`` (list), ``lr``.
    """

    task: EventTask
    kind: EventKind
    step: int = 0
    total: int = 0
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        # a misspelt name fails here, where it is made, not in a comparison that is never true
        self.task = EventTask(self.task)
        self.kind = EventKind(self.kind)


Callback = Callable[[ProgressEvent], None]


class StopFlag:
    """A thread-safe request to stop, checked cooperatively by the engine."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        """Ask the running task to stop (callable from any thread)."""
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`StopRequested` if a stop was requested."""
        if self._event.is_set():
            raise StopRequested("stopped on request")


class Reporter:
    """Small helper that stamps elapsed time and fans an event out to callbacks."""

    def __init__(self, task: EventTask, callbacks: Callback | list[Callback] | None = None) -> None:
        self.task = EventTask(task)
        if callbacks is None:
            callbacks = []
        elif callable(callbacks):
            callbacks = [callbacks]
        self.callbacks = list(callbacks)
        self.t0 = time.perf_counter()

    def __call__(self, kind: EventKind, **kwargs) -> None:
        if not self.callbacks:
            return
        ev = ProgressEvent(self.task, kind, elapsed=time.perf_counter() - self.t0, **kwargs)
        for cb in self.callbacks:
            cb(ev)
