"""Background work for the widgets: engine calls in a napari thread worker, events to the GUI thread.

The engine reports :class:`~napari_hdn.engine.ProgressEvent` s by calling a callback *in the worker
thread*. :class:`EngineTask` gives it a callback that only puts the event on a queue; a timer in the
GUI thread drains the queue (every 100 ms by default), so widgets are only ever touched from the GUI
thread and a fast loop (hundreds of steps per second) cannot flood the event loop.

Exceptions never leave the worker: the job's result or exception comes back as an :class:`Outcome`
through the worker's ``returned`` signal (delivered in the GUI thread), and the widget turns
errors into notifications there (:func:`user_message`).
"""

from __future__ import annotations

import logging
import os
import queue
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QObject, QTimer

from ..engine import HDNError, ProgressEvent, StopFlag, StopRequested

log = logging.getLogger("napari_hdn")

Job = Callable[[Callable[[ProgressEvent], None], StopFlag], Any]


@dataclass
class Outcome:
    """What a job returned, or the exception it raised (with its formatted traceback)."""

    value: Any = None
    error: BaseException | None = None
    details: str = ""
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


OOM_ADVICE = (
    "Out of memory. Use a smaller batch size, patch size or tile size, fewer samples, a smaller "
    "model preset, or the CPU (which has more memory than most GPUs), then run again."
)


def user_message(exc: BaseException, what: str) -> tuple[str, bool]:
    """A message for a notification, and whether the problem is the user's to fix (not a bug)."""
    if isinstance(exc, HDNError):
        return f"{what}: {exc}", True
    if is_out_of_memory(exc):
        return f"{what}: {OOM_ADVICE}", True
    if isinstance(exc, ValueError):  # e.g. pydantic validation of settings
        first = str(exc).strip().splitlines()
        return f"{what}: invalid settings: {' '.join(first[:3])}", True
    return f"{what} failed unexpectedly: {type(exc).__name__}: {exc} (details in the log)", False


def default_cpu_threads() -> int:
    """Torch threads for widget jobs: all cores but one (at least 1), at most torch's default.

    The GUI thread (and, without a GPU, OpenGL rendering) needs a core: OpenMP threads that wait
    for each other at every operation slow everything down when all cores are taken.
    """
    import torch

    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))


def job_threads(interactive: bool = False) -> int:
    """Torch threads for the next widget job: the user's setting (Training > Advanced), else auto.

    Auto gives long jobs (training, prediction, the levels' description) all cores but one. A short
    job the user waits on (``interactive``, e.g. the artefact preview) gets every core when no
    other job of the widgets is running: the GUI thread idles while the user waits. With another
    job running it keeps to all cores but one, so the two never wait on each other's OpenMP threads.
    """
    from ..session import get_session

    n = get_session().cpu_threads
    if n:
        return n
    if interactive and not any(task.running for task in list(_TASKS)):
        import torch

        return max(1, torch.get_num_threads())
    return default_cpu_threads()


def _stoppable_worker_class():
    from napari.qt.threading import FunctionWorker

    class StoppableWorker(FunctionWorker):
        """A FunctionWorker whose quit() (napari's activity dock Cancel, napari quitting) stops the
        engine job through its StopFlag instead of waiting for it to finish."""

        stop_flag: StopFlag | None = None

        def quit(self) -> None:
            if self.stop_flag is not None:
                self.stop_flag.set()
            super().quit()

    return StoppableWorker


_TASKS: weakref.WeakSet = weakref.WeakSet()  # every EngineTask (GUI thread only)


class EngineTask(QObject):
    """One engine job at a time, run in a napari ``FunctionWorker``.

    Parameters
    ----------
    parent : QObject
        Owner (the widget); the drain timer lives with it in the GUI thread.
    on_events : callable(list[ProgressEvent])
        Called in the GUI thread with the events that arrived since the last call.
    on_finished : callable(Outcome)
        Called in the GUI thread once the job has ended, after the last events were delivered.
    """

    def __init__(self, parent: QObject, on_events: Callable[[list], None],
                 on_finished: Callable[[Outcome], None], poll_ms: int = 100) -> None:
        super().__init__(parent)
        self._on_events = on_events
        self._on_finished = on_finished
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._timer = QTimer(self)
        self._timer.setInterval(poll_ms)
        self._timer.timeout.connect(self._drain)
        self.stop_flag = StopFlag()
        self.worker = None
        self.threads = 0  # torch threads of the last job started
        _TASKS.add(self)
        # closing the widget (or the viewer) stops a running job within one step
        parent.destroyed.connect(lambda *_, task=self: _stop_quietly(task))

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, job: Job, name: str = "napari-hdn", interactive: bool = False) -> None:
        """Run ``job(report, stop_flag)`` in a worker thread (``interactive``: a short job the
        user waits on, which may use every core; see :func:`job_threads`)."""
        if self.running:
            raise RuntimeError("a job is already running")
        from napari.qt.threading import create_worker

        self.stop_flag = StopFlag()
        report, flag = self._queue.put, self.stop_flag
        threads = job_threads(interactive)
        self.threads = threads

        def run() -> Outcome:
            import torch

            before = torch.get_num_threads()
            torch.set_num_threads(threads)  # per worker thread (OpenMP); restored below
            try:
                return Outcome(value=job(report, flag), stopped=flag.is_set())
            except StopRequested:
                return Outcome(stopped=True)
            except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread as a notification
                return Outcome(error=exc, details=traceback.format_exc())
            finally:
                torch.set_num_threads(before)

        run.__name__ = name
        worker = create_worker(run, _start_thread=False, _worker_class=_stoppable_worker_class())
        worker.stop_flag = flag
        worker.returned.connect(self._returned)
        self.worker = worker
        self._timer.start()
        worker.start()

    def stop(self) -> None:
        """Ask the running job to stop (it checks at least once per step)."""
        self.stop_flag.set()

    def _drain(self) -> None:
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if events:
            self._on_events(events)

    def _returned(self, outcome: Outcome) -> None:
        self._timer.stop()
        self._drain()
        self.worker = None
        if outcome.error is not None and not user_message(outcome.error, "")[1]:
            log.error("napari-hdn job failed:\n%s", outcome.details)
        self._on_finished(outcome)


def _stop_quietly(task: EngineTask) -> None:
    try:
        task.stop_flag.set()
    except RuntimeError:  # already deleted
        pass
