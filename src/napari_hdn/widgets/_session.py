"""State shared by the napari-hdn widgets: the noise models and HDN models of this session.

The noise-model widget adds noise models here, the training widget reads them and adds trained
models, and the predict and artefact-removal widgets read those, so the whole workflow runs without
a file dialog. Opening a ``.hdn`` or ``.hdnoise`` file (File > Open, drag and drop) registers it here
too: the npe2 reader gets no viewer, which is why there is one session per Python process rather
than one per viewer.

Everything here is touched from the GUI thread only (workers hand their results back first).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from psygnal import Signal

from ..engine import HDNModel, NoiseModel


@dataclass(eq=False)
class NoiseEntry:
    """A noise model known to the session."""

    name: str
    model: NoiseModel
    source: str = ""
    path: Path | None = None
    #: held-out pairs kept for the diagnostics figure (signal, observation), when fitted here
    heldout: tuple | None = field(default=None, repr=False)


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

    @property
    def steps(self) -> int:
        return int(self.model.info.get("steps", 0) or 0)


def _unique(name: str, taken) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name} ({k})" in taken:
        k += 1
    return f"{name} ({k})"


class HDNSession:
    """Registry of noise models and HDN models, with signals the widgets subscribe to.

    Signals carry the name of the entry that was added (or ``""`` after :meth:`clear`).
    """

    noise_models_changed = Signal(str)
    models_changed = Signal(str)

    def __init__(self) -> None:
        self.noise_models: dict[str, NoiseEntry] = {}
        self.models: dict[str, ModelEntry] = {}
        #: torch threads for the widgets' jobs; None: all cores but one (see _workers)
        self.cpu_threads: int | None = None
        self._tmp: Path | None = None

    # -- noise models ----------------------------------------------------------------------------
    def add_noise_model(self, model: NoiseModel, name: str, source: str = "", path=None,
                        heldout=None) -> NoiseEntry:
        entry = NoiseEntry(_unique(name, self.noise_models), model, source,
                           Path(path) if path else None, heldout)
        self.noise_models[entry.name] = entry
        self.noise_models_changed.emit(entry.name)
        return entry

    def noise_model(self, name: str | None) -> NoiseEntry | None:
        return self.noise_models.get(name) if name else None

    # -- HDN models ------------------------------------------------------------------------------
    def add_model(self, model: HDNModel, name: str, source: str = "", path=None, checkpoint=None,
                  layer_name: str | None = None, axes: str | None = None) -> ModelEntry:
        entry = ModelEntry(_unique(name, self.models), model, source, Path(path) if path else None,
                           Path(checkpoint) if checkpoint else None, layer_name, axes)
        self.models[entry.name] = entry
        self.models_changed.emit(entry.name)
        return entry

    def model(self, name: str | None) -> ModelEntry | None:
        return self.models.get(name) if name else None

    # -- scratch space for checkpoints -------------------------------------------------------------
    def scratch_dir(self, prefix: str) -> Path:
        """A fresh folder for one training run's checkpoints (removed when Python exits)."""
        if self._tmp is None or not self._tmp.exists():
            self._tmp = Path(tempfile.mkdtemp(prefix="napari-hdn-"))
            atexit.register(shutil.rmtree, self._tmp, True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self._tmp))

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
