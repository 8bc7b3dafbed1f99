"""What the napari-hdn widgets share in one Python process: noise models, HDN models, training runs.

The noise-model widget adds noise models here, the training widget reads them and adds trained
models, and the predict and artefact-removal widgets read those, so the whole workflow runs without
a file dialog. Opening a ``.hdn`` or ``.hdnoise`` file (File > Open, drag and drop) registers it here
too: the npe2 reader gets no viewer, which is why there is one session per Python process rather
than one per viewer.

This module imports neither Qt nor napari (the file reader imports it). Signals are psygnal's;
entries are added from the GUI thread only (workers hand their results back first).

Training runs write their checkpoints to a folder of their own under :attr:`HDNSession.runs_root`.
Folders of finished runs are removed when Python exits. A run interrupted because its widget or
viewer closed is kept, with a note saying what it was, and the Training widget says where it is.
"""

from __future__ import annotations

import atexit
import datetime
import enum
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from psygnal import Signal

from .engine import HDNModel, NoiseModel, StopFlag

log = logging.getLogger("napari_hdn")

#: environment variable naming the folder for training runs (default: the user's data folder)
RUNS_DIR_ENV = "NAPARI_HDN_RUNS_DIR"
INTERRUPTED_NOTE = "interrupted.json"


class Registry(enum.Enum):
    """The session's registries of models, for :meth:`HDNSession.entries` and
    :meth:`HDNSession.changed` (a chooser of one of them, say)."""

    MODELS = "models"
    NOISE_MODELS = "noise models"


@dataclass(eq=False)
class NoiseEntry:
    """A noise model known to the session.

    ``name`` is short and starts with what tells models apart (kind and settings, then source);
    ``description`` is the full text (shown as a tooltip).
    """

    name: str
    model: NoiseModel
    source: str = ""
    path: Path | None = None
    #: held-out pairs kept for the diagnostics figure (signal, observation), when fitted here
    heldout: tuple | None = field(default=None, repr=False)
    description: str = ""


@dataclass(eq=False)
class ModelEntry:
    """A trained (or loaded) HDN model known to the session."""

    name: str
    model: HDNModel
    source: str = ""
    path: Path | None = None
    #: checkpoint with optimiser state (``last.hdn``) that Resume continues from, if any
    checkpoint: Path | None = None
    layer_name: str | None = None
    axes: str | None = None
    #: the training curves drawn while it trained (plain lists), continued on Resume
    curves: dict | None = field(default=None, repr=False)
    description: str = ""

    @property
    def steps(self) -> int:
        """Training steps (with channels: of all channels together)."""
        steps = self.model.info.get("steps", 0) or 0
        return int(sum(s or 0 for s in steps)) if isinstance(steps, list) else int(steps)


@dataclass(eq=False)
class TrainingRun:
    """The checkpoint folder of one training run, and whether it must outlive the session."""

    directory: Path
    label: str
    stop_flag: StopFlag = field(default_factory=StopFlag)
    done: threading.Event = field(default_factory=threading.Event)
    keep: bool = False
    #: the user pressed Stop (a stop from anywhere else means the run was interrupted)
    user_stopped: bool = False

    @property
    def last_checkpoint(self) -> Path:
        return self.directory / "last.hdn"

    @property
    def best_checkpoint(self) -> Path:
        return self.directory / "best.hdn"

    def interrupt(self, reason: str) -> Path:
        """Stop the run within one step and keep its folder; returns the checkpoint to resume from.

        Called when the run's widget goes away (its viewer closed) while it trains: the model in
        memory is lost with the widget, the checkpoints on disk are not. Calling it again does
        nothing more.
        """
        self.stop_flag.set()
        if self.keep:
            return self.last_checkpoint
        self.keep = True
        note = {"label": self.label, "reason": reason,
                "when": datetime.datetime.now().isoformat(timespec="seconds"),
                "checkpoint": str(self.last_checkpoint), "best": str(self.best_checkpoint)}
        try:
            (self.directory / INTERRUPTED_NOTE).write_text(json.dumps(note, indent=1))
        except OSError as exc:  # the note is a courtesy; the message below still says where
            log.warning("could not write %s: %s", self.directory / INTERRUPTED_NOTE, exc)
        log.warning("napari-hdn: training of %s was interrupted (%s). Its checkpoints are kept in %s "
                    "(last.hdn resumes, best.hdn is the best model so far); open one with "
                    "File > Open.", self.label, reason, self.directory)
        return self.last_checkpoint


@dataclass
class KeptRun:
    """A training run kept on disk by an earlier interruption (this session or an earlier one)."""

    directory: Path
    label: str
    reason: str
    when: str
    checkpoint: Path | None  # None when it stopped before writing one

    def message(self) -> str:
        if self.checkpoint is None:
            return (f"The training of {self.label} was interrupted on {self.when} ({self.reason}) "
                    f"before its first checkpoint; nothing to resume (folder {self.directory}).")
        return (f"The training of {self.label} was interrupted on {self.when} ({self.reason}). Its "
                f"last checkpoint is {self.checkpoint}: open it with File > Open and Resume it here, "
                f"or delete the folder {self.directory}.")


def _unique(name: str, taken) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name} ({k})" in taken:
        k += 1
    return f"{name} ({k})"


def default_runs_root() -> Path:
    """Where training runs write checkpoints: $NAPARI_HDN_RUNS_DIR or the user's data folder."""
    env = os.environ.get(RUNS_DIR_ENV)
    if env:
        return Path(env)
    try:
        from platformdirs import user_data_path

        return user_data_path("napari-hdn", appauthor=False) / "training-runs"
    except Exception:  # noqa: BLE001 - no writable home: a temporary folder still works
        return Path(tempfile.gettempdir()) / "napari-hdn-training-runs"


class HDNSession:
    """Registry of noise models, HDN models and training runs, with signals the widgets follow.

    Signals carry the name of the entry that was added (or ``""`` after :meth:`clear`).
    """

    noise_models_changed = Signal(str)
    models_changed = Signal(str)

    def __init__(self) -> None:
        self.noise_models: dict[str, NoiseEntry] = {}
        self.models: dict[str, ModelEntry] = {}
        #: torch threads for the widgets' jobs, the user's choice; None: automatic
        #: (:func:`napari_hdn.engine.threads.job_threads`)
        self.cpu_threads: int | None = None
        self.runs: list[TrainingRun] = []
        self._cleanup_registered = False

    def entries(self, registry: Registry) -> dict:
        """The entries of ``registry`` by name (HDN models or noise models)."""
        return {Registry.MODELS: self.models, Registry.NOISE_MODELS: self.noise_models}[registry]

    def changed(self, registry: Registry):
        """The signal emitted when an entry is added to ``registry`` (its name) or on clear."""
        return {Registry.MODELS: self.models_changed,
                Registry.NOISE_MODELS: self.noise_models_changed}[registry]

    # -- noise models ----------------------------------------------------------------------------
    def add_noise_model(self, model: NoiseModel, name: str, source: str = "", path=None,
                        heldout=None, description: str = "") -> NoiseEntry:
        entry = NoiseEntry(_unique(name, self.noise_models), model, source,
                           Path(path) if path else None, heldout, description or name)
        self.noise_models[entry.name] = entry
        self.noise_models_changed.emit(entry.name)
        return entry

    def noise_model(self, name: str | None) -> NoiseEntry | None:
        return self.noise_models.get(name) if name else None

    # -- HDN models ------------------------------------------------------------------------------
    def add_model(self, model: HDNModel, name: str, source: str = "", path=None, checkpoint=None,
                  layer_name: str | None = None, axes: str | None = None, curves: dict | None = None,
                  description: str = "") -> ModelEntry:
        entry = ModelEntry(_unique(name, self.models), model, source, Path(path) if path else None,
                           Path(checkpoint) if checkpoint else None, layer_name,
                           axes or model.info.get("axes"), curves, description or source)
        self.models[entry.name] = entry
        self.models_changed.emit(entry.name)
        return entry

    def model(self, name: str | None) -> ModelEntry | None:
        return self.models.get(name) if name else None

    # -- files -----------------------------------------------------------------------------------
    def open_model_file(self, path) -> ModelEntry:
        """Load a ``.hdn`` file and register it (raises ModelFileError for a bad file)."""
        from .engine import load_model

        return self.add_model(load_model(path), Path(path).stem, f"file {path}", path=path)

    def open_noise_model_file(self, path) -> NoiseEntry:
        """Load a ``.hdnoise`` file and register it (raises ModelFileError for a bad file)."""
        from .engine import load_noise_model

        nm = load_noise_model(path)
        return self.add_noise_model(nm, Path(path).stem, f"file {path}", path,
                                    description=f"{nm!r} from file {path}")

    # -- training runs ---------------------------------------------------------------------------
    @property
    def runs_root(self) -> Path:
        return default_runs_root()

    def new_run(self, label: str, prefix: str = "train-") -> TrainingRun:
        """A fresh checkpoint folder for one training run (removed at exit unless interrupted)."""
        root = self.runs_root
        root.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-")
        run = TrainingRun(Path(tempfile.mkdtemp(prefix=prefix + stamp, dir=root)), label)
        self.runs.append(run)
        if not self._cleanup_registered:
            atexit.register(self.cleanup)
            self._cleanup_registered = True
        return run

    def kept_runs(self) -> list[KeptRun]:
        """Runs kept by an interruption, newest first, that are not running in this session."""
        root = self.runs_root
        live = {r.directory for r in self.runs if not r.done.is_set()}
        out = []
        if not root.is_dir():
            return out
        for note in root.glob(f"*/{INTERRUPTED_NOTE}"):
            d = note.parent
            if d in live:
                continue
            try:
                info = json.loads(note.read_text())
            except (OSError, ValueError):
                continue
            ck = d / "last.hdn"
            out.append(KeptRun(d, info.get("label", d.name), info.get("reason", "interrupted"),
                               info.get("when", "?"), ck if ck.exists() else None))
        return sorted(out, key=lambda r: r.when, reverse=True)

    def cleanup(self, wait_s: float = 60.0) -> None:
        """Remove the folders of this session's runs, except interrupted ones (called at exit).

        A run that is still stopping gets up to ``wait_s`` seconds to write its last checkpoint.
        """
        for run in list(self.runs):
            if not run.done.is_set():
                run.stop_flag.set()
                run.done.wait(wait_s)
            if run.keep and run.last_checkpoint.exists():
                continue
            shutil.rmtree(run.directory, ignore_errors=True)
            self.runs.remove(run)

    def clear(self) -> None:
        """Forget every model (used by tests; files on disk are left alone)."""
        self.noise_models.clear()
        self.models.clear()
        self.noise_models_changed.emit("")
        self.models_changed.emit("")


_SESSION: HDNSession | None = None


def get_session() -> HDNSession:
    """The process-wide session shared by all widgets and the file reader."""
    global _SESSION
    if _SESSION is None:
        _SESSION = HDNSession()
    return _SESSION
