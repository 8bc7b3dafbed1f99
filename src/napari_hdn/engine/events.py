"""Progress events and cooperative stopping, shared by every long-running engine task.

Front ends (CLI progress bars, Qt widgets, notebooks) subscribe with a plain callable; the engine
never knows which. A :class:`StopFlag` is set from any thread and checked by the engine at least
once per optimisation step, so a stop takes effect within one step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import StopRequested


@dataclass
class ProgressEvent:
    """One report from a long-running task.

    Attributes
    ----------
    task : str
        What runs: ``"train"``, ``"noise-fit"``, ``"n2v"``, ``"predict"``...
    kind : str
        ``"start"``, ``"step"``, ``"epoch"`` (a validation was done), ``"done"``, ``"stopped"``.
    step, total : int
        Progress so far and the planned total (optimizer steps, tiles, ...).
    metrics : dict
        Numbers such as ``train_loss``, ``val_loss``, ``kl_per_level`` (list), ``lr``.
    """

    task: str
    kind: str
    step: int = 0
    total: int = 0
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    elapsed: float = 0.0


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

    def __init__(self, task: str, callbacks: Callback | list[Callback] | None = None) -> None:
        self.task = task
        if callbacks is None:
            callbacks = []
        elif callable(callbacks):
            callbacks = [callbacks]
        self.callbacks = list(callbacks)
        self.t0 = time.perf_counter()

    def __call__(self, kind: str, **kwargs) -> None:
        if not self.callbacks:
            return
        ev = ProgressEvent(self.task, kind, elapsed=time.perf_counter() - self.t0, **kwargs)
        for cb in self.callbacks:
            cb(ev)
