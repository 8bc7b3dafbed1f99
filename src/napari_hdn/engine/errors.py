"""Exceptions raised by the engine.

Every user-facing mistake raises a subclass of :class:`HDNError` whose message names the problem
and the fix, so that the command line and the widgets can show it without a traceback.
"""


class HDNError(Exception):
    """Base class for errors a user can fix (bad input, bad file, bad settings)."""


class InputError(HDNError, ValueError):
    """An image, axes string or argument is not usable as given."""


class OptionError(HDNError, TypeError):
    """An unknown option or a contradictory combination of options was passed to a function."""


class HDNWarning(UserWarning):
    """Something the user should know before the work starts (suspicious axes, data far from what
    a model was trained on); the command line prints these as one line each."""


class SuspiciousNoiseModelWarning(HDNWarning):
    """Training was started with a noise model whose fit was judged "suspicious"."""


class ModelFileError(HDNError, ValueError):
    """A model or noise-model file is missing, unreadable, corrupt, foreign, edited into something
    unusable (non-finite weights, a zero normalisation std) or from an incompatible version."""


class OutputError(HDNError, OSError):
    """An output cannot be written: it would replace an input, it exists (and overwriting was not
    asked for), its folder is not writable, or the disk is full. Nothing was written, and a file
    that was there before is unchanged."""


class DeviceError(HDNError):
    """The requested compute device is not available."""


class TrainingDivergedError(HDNError):
    """Training produced non-finite losses too many times in a row."""


class StopRequested(HDNError):  # noqa: N818 - it is a signal, not a failure
    """Raised inside long work (training, prediction, noise-model fitting) when a cooperative stop
    was requested through a :class:`~napari_hdn.engine.StopFlag`."""
