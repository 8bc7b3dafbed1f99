"""npe2 reader: opening a ``.hdn`` model or a ``.hdnoise`` noise-model file in napari.

Model files hold no image, so the reader adds **no layer**: it registers the model in the widgets'
shared session (:func:`napari_hdn.session.get_session`, which imports no Qt), where the Training
(Resume), Predict and explore and Artefact removal widgets list it, and says so in a notification.
It returns napari's "no layers" sentinel ``[(None,)]``. A damaged or foreign file gives an error
notification with the reason instead of an exception. Importing this module imports neither Qt nor
matplotlib (nor torch: the engine is imported when a file is read).
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


def _read(path, load, register) -> list[tuple]:
    """Load a file with ``load``, register it with ``register(obj, path)`` (which returns the
    message to show), or show why it could not be opened."""
    from napari.utils.notifications import show_error, show_info

    from .engine import HDNError

    p = _one(path)
    try:
        obj = load(p)
    except HDNError as exc:
        show_error(f"Could not open {p}: {exc}")
        return [(None,)]
    show_info(register(obj, p))
    return [(None,)]


def read_model_file(path) -> list[tuple]:
    """Load an HDN model file into the session; returns no layers."""
    from .engine import load_model
    from .session import get_session

    def register(model, p):
        entry = get_session().add_model(model, Path(p).stem, f"file {p}", path=p)
        return (f"HDN model '{entry.name}' loaded ({model.levels} levels, {entry.steps} training "
                "steps). Choose it in Plugins > Hierarchical DivNoising > Predict and explore or "
                "Artefact removal.")

    return _read(path, load_model, register)


def read_noise_model_file(path) -> list[tuple]:
    """Load a noise-model file into the session; returns no layers."""
    from .engine import load_noise_model
    from .session import get_session

    def register(nm, p):
        entry = get_session().add_noise_model(nm, Path(p).stem, f"file {p}", path=p,
                                              description=f"{nm!r} from file {p}")
        return f"Noise model '{entry.name}' loaded: choose it in the Training widget."

    return _read(path, load_noise_model, register)
