"""npe2 reader: opening a ``.hdn`` model or a ``.hdnoise`` noise-model file in napari.

Model files hold no image, so the reader adds **no layer**: it registers the model in the widgets'
shared session (:func:`napari_hdn.widgets.get_session`), where the Training (Resume), Predict and
explore and Artefact removal widgets list it, and says so in a notification. It returns napari's
"no layers" sentinel ``[(None,)]``. A damaged or foreign file gives an error notification with the
reason instead of an exception.
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


def read_model_file(path) -> list[tuple]:
    """Load an HDN model file into the session; returns no layers."""
    from napari.utils.notifications import show_error, show_info

    from .engine import HDNError, load_model
    from .widgets._session import get_session

    p = _one(path)
    try:
        model = load_model(p)
    except HDNError as exc:
        show_error(f"Could not open {p}: {exc}")
        return [(None,)]
    entry = get_session().add_model(model, Path(p).stem, f"file {p}", path=p)
    show_info(
        f"HDN model '{entry.name}' loaded ({model.levels} levels, {entry.steps} training steps). "
        "Choose it in Plugins > Hierarchical DivNoising > Predict and explore or Artefact removal."
    )
    return [(None,)]


def read_noise_model_file(path) -> list[tuple]:
    """Load a noise-model file into the session; returns no layers."""
    from napari.utils.notifications import show_error, show_info

    from .engine import HDNError, load_noise_model
    from .widgets._session import get_session

    p = _one(path)
    try:
        nm = load_noise_model(p)
    except HDNError as exc:
        show_error(f"Could not open {p}: {exc}")
        return [(None,)]
    entry = get_session().add_noise_model(nm, Path(p).stem, f"file {p}", path=p)
    show_info(f"Noise model '{entry.name}' loaded: choose it in the Training widget.")
    return [(None,)]
