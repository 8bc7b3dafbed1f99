"""napari-hdn: Hierarchical DivNoising for napari and the command line.

The headless API (no Qt needed)::

    >>> import napari_hdn
    >>> nm = napari_hdn.GaussianNoiseModel(sigma=25.0)
    >>> model = napari_hdn.train(noisy, nm, levels=3, max_steps=2000)
    >>> result = model.predict(noisy, n_samples=100)   # result.mmse, result.variance, result.samples
    >>> model.save("model.hdn"); model = napari_hdn.load_model("model.hdn")
"""

from .engine import *  # noqa: F403
from .engine import __all__ as _engine_all

try:
    from importlib.metadata import version as _version

    __version__ = _version("napari-hdn")
except Exception:  # pragma: no cover - not installed
    __version__ = "0.0.0"

__all__ = [*_engine_all, "__version__"]
