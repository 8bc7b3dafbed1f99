"""Exceptions raised by the engine.

Every user-facing mistake raises a subclass of :class:`HDNError` whose message names the problem
and the fix, so that the command line and the widgets can show it without a traceback.
"""


class HDNError(Exception):
    """Base class for errors a user can fix (bad input, bad file, bad settings)."""


class InputError(HDNError, ValueError):
    """An image, axes string or argument is not usable as given."""


class ModelFileError(HDNError):
    """A model or noise-model file is missing, corrupt, foreign or from an incompatible version."""


class DeviceError(HDNError):
    """The requested compute device is not available."""


class TrainingDivergedError(HDNError):
    """Training produced non-finite losses too many times in a row."""


class StopRequested(HDNError):  # noqa: N818 - it is a signal, not a failure
    """Raised inside long work (training, prediction, noise-model fitting) when a cooperative stop
    was requested through a :class:`~napari_hdn.engine.StopFlag`."""


#: The former name, from when only training could be stopped; the same class.
TrainingStopped = StopRequested
