"""The job lifecycle every widget shares: one main engine job at a time, its state, Run/Stop,
progress, status line, and what the user sees when something goes wrong.

A widget subclasses :class:`EngineWidget`, builds its form, calls :meth:`EngineWidget.add_run_row`
and implements:

- ``prepare()`` -> ``(job, meta)``: read and check the inputs in the GUI thread (raise an
  :class:`~napari_hdn.engine.HDNError` saying what to do) and return the engine call to run in the
  worker, ``job(report, stop_flag)``, with what the result handler needs (``meta``);
- ``on_result(outcome)`` -> the new :class:`TaskState`: the job returned (a value, or stopped);
- optionally ``on_start(meta)``, ``on_events(events)``, ``blocker()`` (why Run cannot start yet,
  shown before the click) and ``error_hint(exc)``.

A widget that also runs other kinds of job beside its main one (the artefact widget's preview and
suggestion) registers each with :meth:`EngineWidget.add_task` (its own prepare and result handler)
and starts it with :meth:`EngineWidget.start_task`: it runs in a worker of its own, one at a time
per kind, through the same input checks and error path; the base keeps what it was started with.

Errors never escape: a mistake in the inputs or a failure in the worker is shown as a notification
and, in full, in the widget's status line.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qtpy.QtWidgets import QHBoxLayout, QProgressBar, QPushButton, QWidget

from ..engine.events import EventKind
from ..session import get_session
from ._forms import notify_error, notify_info, notify_warning, set_message, status_label
from ._workers import EngineTask, Outcome, user_message

log = logging.getLogger("napari_hdn")


class TaskState(enum.Enum):
    """Where a widget's job stands; buttons are enabled from it."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class SideTask:
    """A kind of job that runs beside the widget's main one (see :meth:`EngineWidget.add_task`)."""

    what: str
    prepare: Callable[[], tuple]
    on_result: Callable[[Outcome, Any], None]
    on_start: Callable[[Any], None] | None
    interactive: bool
    latest_wins: bool
    task: EngineTask | None = None
    meta: Any = None  # what the last start's prepare returned with the job
    unasked: bool = False  # the running job was not asked for: its failure says nothing
    pending: bool = False  # asked for while running: starts again when it ends


class EngineWidget(QWidget):
    """Base of the widgets that run engine jobs in the background (see the module docstring)."""

    #: names the job in messages ("Training", "Prediction"...)
    what = "Job"
    #: shown while a stop is pending
    stopping_text = "Stopping after the current step…"

    def __init__(self, napari_viewer, parent=None, poll_ms: int = 100) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = get_session()
        self.state = TaskState.IDLE
        self.task = EngineTask(self, self._deliver, self._finished, poll_ms=poll_ms)
        self.meta: Any = {}
        self.side_tasks: dict[str, SideTask] = {}
        self.t0 = 0.0
        self.busy_note = ""  # what the engine said of other work on the machine, this job
        self._what = self.what
        self.run_tip = ""
        self.run_btn = QPushButton("Run")
        self.stop_btn = QPushButton("Stop")
        self.progress = QProgressBar()
        self.blocked = status_label()  # why Run cannot start, before anyone clicks it
        self.blocked.setVisible(False)
        self.status = status_label()
        self.run_btn.clicked.connect(lambda: self.start())
        self.stop_btn.clicked.connect(self.stop)

    # -- layout ------------------------------------------------------------------------------------
    def add_run_row(self, layout, run_text: str, *, idle_text: str = "", progress_format: str = "",
                    extra_buttons=(), stop_tip: str = "") -> None:
        """Run and Stop buttons (and ``extra_buttons``), the reason line, progress bar and status."""
        self.run_btn.setText(run_text)
        if stop_tip:
            self.stop_btn.setToolTip(stop_tip)
        row = QHBoxLayout()
        for b in (self.run_btn, self.stop_btn, *extra_buttons):
            row.addWidget(b)
        layout.addLayout(row)
        layout.addWidget(self.blocked)
        if progress_format:
            self.progress.setFormat(progress_format)
        layout.addWidget(self.progress)
        self.status.setText(idle_text)
        layout.addWidget(self.status)

    # -- what subclasses give ----------------------------------------------------------------------
    def prepare(self):
        raise NotImplementedError

    def on_result(self, out: Outcome) -> TaskState:
        raise NotImplementedError

    def on_start(self, meta) -> None:
        total = int(meta.get("total", 0))
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        self.show_status("Starting…")

    def on_events(self, events) -> None:
        for ev in events:
            if ev.kind == EventKind.START and ev.total:
                self.progress.setRange(0, max(1, ev.total))
            if ev.kind in (EventKind.START, EventKind.STEP):
                self.progress.setValue(min(ev.step, self.progress.maximum()))

    def blocker(self) -> str:
        """Why the job cannot start with the inputs as they are ("" when it can)."""
        return ""

    def error_hint(self, exc: BaseException) -> str:
        """Advice appended to the message of a failed job."""
        return ""

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.state in (TaskState.RUNNING, TaskState.STOPPING)

    def start(self, prepare=None, what: str | None = None) -> bool:
        """Check the inputs and start the job in the background. Returns True if it started."""
        what = what or self.what
        if self.task.running:
            notify_warning(f"{what}: already running; stop it first.")
            return False
        prep = self.guard(what, prepare or self.prepare)
        if prep is None:
            return False
        job, meta = prep
        self.meta, self._what, self.t0 = meta, what, time.perf_counter()
        self.busy_note = ""
        self.on_start(meta)
        self.set_state(TaskState.RUNNING)
        self.task.start(job, name=f"napari-hdn {what.lower()}")
        return True

    def stop(self) -> None:
        """Ask the job to stop; the engine checks at least once per step."""
        if self.task.running:
            self.task.stop()
            self.set_state(TaskState.STOPPING)
            self.show_status(self.stopping_text)

    # -- jobs beside the main one ------------------------------------------------------------------
    def add_task(self, what: str, prepare, on_result, *, on_start=None, interactive=False,
                 latest_wins=False, poll_ms: int = 200) -> EngineTask:
        """Register a kind of job that runs beside the main one, in a worker of its own.

        ``prepare()`` -> ``(job, meta)`` as for the main job; ``on_result(outcome, meta)`` gets what
        the job returned (a value, or None when stopped; a failure is shown here); ``on_start(meta)``
        follows each start. ``interactive``: a short job the user waits on. ``latest_wins``: a start
        while one runs queues one more, which prepares anew with the newest inputs.
        """
        side = SideTask(what, prepare, on_result, on_start, interactive, latest_wins)
        side.task = EngineTask(self, lambda events: None,
                               lambda out: self._side_finished(side, out), poll_ms=poll_ms)
        self.side_tasks[what] = side
        return side.task

    def start_task(self, what: str, *, quiet: bool = False, unasked: bool = False) -> bool:
        """Start the job ``what`` (see :meth:`add_task`). Returns True if it started or was queued.

        ``quiet``: inputs that are not ready say nothing (a start that follows a setting change);
        ``unasked``: work the user did not ask for, of which nothing is said, not even a failure.
        """
        side = self.side_tasks[what]
        if side.task.running:
            side.pending = side.pending or side.latest_wins
            return side.latest_wins
        if quiet or unasked:
            try:
                prep = side.prepare()
            except Exception:  # noqa: BLE001 - inputs not ready, and nobody asked to be told
                return False
        else:
            prep = self.guard(what, side.prepare)
        if prep is None:
            return False
        job, side.meta = prep
        side.unasked = unasked
        if side.on_start is not None:
            side.on_start(side.meta)
        side.task.start(job, name=f"napari-hdn {what.lower()}", interactive=side.interactive)
        self.update_controls()
        return True

    def stop_task(self, what: str) -> None:
        """Stop the job ``what`` if it runs, and drop a start queued after it."""
        side = self.side_tasks[what]
        side.pending = False
        if side.task.running:
            side.task.stop()

    def _side_finished(self, side: SideTask, out: Outcome) -> None:
        if not out.ok:
            if not side.unasked:
                self.show_error(user_message(out.error, side.what)[0])
        else:
            side.on_result(out, side.meta)
        self.update_controls()
        if side.pending:
            side.pending = False
            self.start_task(side.what, quiet=True)

    # -- errors and messages -----------------------------------------------------------------------
    def guard(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; a user error becomes a message (notification and status line)
        and None is returned, so that a bad input never escapes as an exception."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            msg, expected = user_message(exc, what)
            if not expected:
                log.exception("%s failed", what)
            self.show_error(msg)
            return None

    def show_error(self, message: str) -> None:
        """A notification (which napari may shorten) and the whole message in the widget."""
        notify_error(message)
        set_message(self.status, message, error=True)

    def show_status(self, text: str) -> None:
        set_message(self.status, text)

    def _deliver(self, events) -> None:
        self.on_events(events)
        for ev in events:  # the engine noticed other work competing for the cores
            said = (ev.metrics or {}).get("busy")
            if said:
                notify_info(f"{self._what}: {said}.")
                self.busy_note = said

    def _finished(self, out: Outcome) -> None:
        if not out.ok:
            msg, _ = user_message(out.error, self._what)
            self.show_error(msg + self.error_hint(out.error))
            self.set_state(TaskState.FAILED)
            return
        self.set_state(self.on_result(out) or TaskState.DONE)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # -- state -------------------------------------------------------------------------------------
    def set_state(self, state: TaskState) -> None:
        self.state = state
        self.update_controls()

    def update_controls(self, *_) -> None:
        """Enable the buttons from the state, and say why Run is disabled when it is."""
        reason = "" if self.busy else self.blocker()
        self.run_btn.setEnabled(not self.busy and not reason)
        self.run_btn.setToolTip(f"Cannot start: {reason}" if reason else self.run_tip)
        set_message(self.blocked, f"{self.run_btn.text()} is disabled: {reason}" if reason else "",
                    error=False)
        self.blocked.setVisible(bool(reason))
        self.stop_btn.setEnabled(self.state == TaskState.RUNNING)
