"""The napari widgets of napari-hdn (Qt; the engine they drive stays Qt-free).

- :class:`NoiseModelWidget`: fit or set the pixel noise model.
- :class:`TrainingWidget`: train an HDN in the background (live curves, Stop, Resume, Save).
- :class:`PredictWidget`: posterior samples, MMSE and variance layers.
- :class:`ArtefactWidget`: per-level latent control with a live preview, and Apply.

Each is an :class:`~napari_hdn.widgets._base.EngineWidget` (one main background job at a time:
state, Run/Stop, progress, status, errors; other kinds of job, such as the artefact preview, run
beside it through the same lifecycle). Shared parts live in their own modules, and no widget imports
another: ``_base`` (the job lifecycle), ``_workers`` (worker threads), ``_inputs`` (choosers and
input checks), ``_layers`` (output layers, the view), ``_forms`` (form helpers, dialogs), ``_plot``
(matplotlib canvases), ``_artefact_forms`` (the artefact widget's level table and settings).
They share one :class:`~napari_hdn.session.HDNSession` (see :func:`get_session`), so the output
of one widget is the input of the next without file dialogs.
"""

from ..session import HDNSession, get_session
from .artefact_widget import ArtefactWidget
from .noise_widget import NoiseModelWidget
from .predict_widget import PredictWidget
from .train_widget import TrainingWidget

__all__ = [
    "ArtefactWidget",
    "HDNSession",
    "NoiseModelWidget",
    "PredictWidget",
    "TrainingWidget",
    "get_session",
]
