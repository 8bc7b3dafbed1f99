"""The job lifecycle every widget shares: one engine job at a time, its state, Run/Stop, progress,
status line, and what the user sees when something goes wrong.

A widget subclasses :class:`EngineWidget`, builds its form, calls :meth:`EngineWidget.add_run_row`
and implements:

- ``prepare()`` -> ``(job, meta)``: read and check the inputs in the GUI thread (raise an
  :class:`~napari_hdn.engine.HDNError` saying what to do) and return the engine call to run in the
  worker, ``job(report, stop_flag)``, with what the result handler needs (``meta``);
- ``on_result(outcome)`` -> the new :class:`TaskState`: the job returned (a value, or stopped);
- optionally ``on_start(meta)``, ``on_events(events)``, ``blocker()`` (why Run cannot start yet,
  shown before the click) and ``error_hint(exc)``.

Errors never escape: a mistake in the inputs or a failure in the worker is shown as a notification
and, in full, in the widget's status line.
"""

from __future__ import annotations

import enum
import logging
import time

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
        self.meta: dict = {}
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

    def on_start(self, meta: dict) -> None:
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
