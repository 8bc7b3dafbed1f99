"""npe2 reader: opening a ``.hdn`` model or a ``.hdnoise`` noise-model file in napari.

Model files hold no image, so the reader adds **no layer**: it registers the model in the widgets'
shared session (:func:`napari_hdn.session.get_session`, which imports no Qt), where the Training
(Resume), Predict and explore and Artefact removal widgets list it, and says so in a notification.
It returns napari's "no layers" sentinel ``[(None,)]``. A damaged or foreign file gives an error
notification with the reason instead of an exception, and so does a path that is no regular file
(a FIFO, a device, a folder, a symbolic link loop: refused from ``os.stat``, never opened).
Importing this module imports neither Qt nor matplotlib (nor torch: the engine is imported when a
file is read).
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_SUFFIX = ".hdn"
NOISE_SUFFIX = ".hdnoise"


def get_reader(path):
    """Return a reader for a single ``.hdn`` / ``.hdnoise`` path, else None (let others try)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    suffix = Path(os.fspath(path)).suffix.lower()
    if suffix == MODEL_SUFFIX:
        return read_model_file
    if suffix == NOISE_SUFFIX:
        return read_noise_model_file
    return None


def _one(path) -> str:
    if isinstance(path, (list, tuple)):
        path = path[0]
    return os.fspath(path)


def _read(path, open_file, message) -> list[tuple]:
    """Register the file with the session's ``open_file``, and show ``message(entry)`` or why the
    file could not be opened."""
    from napari.utils.notifications import show_error, show_info

    from .engine import HDNError

    p = _one(path)
    try:
        entry = open_file(p)  # the file is checked before it is opened: a FIFO is never opened
    except (HDNError, OSError) as exc:
        show_error(f"Could not open {p}: {exc}")
        return [(None,)]
    show_info(message(entry))
    return [(None,)]


def read_model_file(path) -> list[tuple]:
    """Load an HDN model file into the session; returns no layers."""
    from .session import get_session

    return _read(path, get_session().open_model_file, lambda e: (
        f"HDN model '{e.name}' loaded ({e.model.levels} levels, {e.steps} training steps). Choose "
        "it in Plugins > Hierarchical DivNoising > Predict and explore or Artefact removal."))


def read_noise_model_file(path) -> list[tuple]:
    """Load a noise-model file into the session; returns no layers."""
    from .session import get_session

    return _read(path, get_session().open_noise_model_file,
                 lambda e: f"Noise model '{e.name}' loaded: choose it in the Training widget.")
