"""The rules every numeric option obeys, in one place, for the command line, the API and the GUI.

:func:`check_options` checks values against :data:`RULES` and names the offending option the way
the caller's user wrote it: ``--batch-size`` on the command line (``style="cli"``), ``batch_size=``
in Python. The engine's functions call it with the API style; the command line calls it with its
own style before any work starts, so both refuse exactly the same values. The classes that hold
such values (:class:`~.noise.gmm.GMMNoiseModel`, :class:`~.config.TrainingConfig`) and the
widgets' spin boxes take their bounds from here too (:func:`bounds`, :func:`field_bounds`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Rule:
    """An integer or a real number, at least (or, ``strict``, above) ``minimum``, at most
    ``maximum``; ``flag`` is the command-line option of the same value."""

    kind: type
    flag: str
    minimum: float | None = None
    strict: bool = False
    maximum: float | None = None
    max_strict: bool = False


#: the largest size of a value in the user's units (signals, noise parameters): what float32
#: arithmetic can square (3.4e38): also the largest pixel magnitude the data may have
MAX_VALUE = 1e18
#: the largest sample count: 1000 times the paper's 100 (a fixed count's memory does not grow
#: with it, its time does: days for a large image)
MAX_SAMPLES = 100_000
#: the largest tile, crop or overlap side in pixels (a tile larger than the image is the image)
MAX_SIDE = 1 << 16

RULES: dict[str, Rule] = {
    # prediction
    "n_samples": Rule(int, "--samples", 1, maximum=MAX_SAMPLES),
    "batch_size": Rule(int, "--batch-size", 1, maximum=4096),
    "tile_size": Rule(int, "--tile-size", 16, maximum=MAX_SIDE),
    "tile_overlap": Rule(int, "--tile-overlap", 0, maximum=MAX_SIDE),
    "threads": Rule(int, "--threads", 1, maximum=1024),
    "workers": Rule(int, "--workers", 1, maximum=1024),
    "margin": Rule(int, "--tile-overlap", 0, maximum=MAX_SIDE),
    "seed": Rule(int, "--seed", 0, maximum=2**63 - 1),
    "crop": Rule(int, "--crop", 16, maximum=MAX_SIDE),
    # noise models with known parameters (in the data's units: squared in float32)
    "sigma": Rule(float, "--gaussian-sigma", 0.0, strict=True, maximum=MAX_VALUE),
    "gain": Rule(float, "--poisson-gain", 0.0, strict=True, maximum=MAX_VALUE),
    "read_noise": Rule(float, "--read-noise", 0.0, maximum=MAX_VALUE),
    "offset": Rule(float, "--offset", -MAX_VALUE, maximum=MAX_VALUE),
    # training
    "minutes": Rule(float, "--minutes", 0.0, strict=True, maximum=1e6),
    "max_steps": Rule(int, "--max-steps", 1, maximum=10**9),
    "patch_size": Rule(int, "--patch-size", 8, maximum=1024),
    "lr": Rule(float, "--lr", 0.0, strict=True, maximum=10.0),
    "grad_clip": Rule(float, "--grad-clip", 0.0, strict=True, maximum=MAX_VALUE),
    "val_fraction": Rule(float, "--val-fraction", 0.0, maximum=0.9, max_strict=True),
    "steps_per_epoch": Rule(int, "--steps-per-epoch", 1, maximum=10**9),
    # noise-model fitting (a GMM file holding more components or a higher degree is refused)
    "n_gaussians": Rule(int, "--gaussians", 1, maximum=16),
    "degree": Rule(int, "--degree", 0, maximum=5),
    "min_variance": Rule(float, "--min-variance", 0.0, strict=True, maximum=MAX_VALUE**2),
    "iterations": Rule(int, "--iterations", 1, maximum=10**7),
    "fit_val_fraction": Rule(float, "--val-fraction", 0.0, maximum=1.0, max_strict=True),
    "n2v_steps": Rule(int, "--n2v-steps", 1, maximum=10**9),
    "n2v_minutes": Rule(float, "--n2v-minutes", 0.0, strict=True, maximum=1e6),
}


def bounds(key: str) -> tuple[float | None, float | None]:
    """The smallest and largest value of ``RULES[key]``: exact for a whole number (a strict bound
    moved inwards by one), as the rule states it for a real number (a strict bound is then itself
    refused: :attr:`Rule.strict`, :attr:`Rule.max_strict`)."""
    rule = RULES[key]
    lo, hi = rule.minimum, rule.maximum
    if rule.kind is int:
        if lo is not None:
            lo = math.floor(lo) + 1 if rule.strict else math.ceil(lo)
        if hi is not None:
            hi = math.ceil(hi) - 1 if rule.max_strict else math.floor(hi)
    return lo, hi


def field_bounds(key: str) -> dict:
    """``RULES[key]`` as the keywords of a pydantic ``Field`` (``ge``/``gt``, ``le``/``lt``)."""
    rule, out = RULES[key], {}
    if rule.minimum is not None:
        out["gt" if rule.strict else "ge"] = rule.minimum
    if rule.maximum is not None:
        out["lt" if rule.max_strict else "le"] = rule.maximum
    return out


def _name(key: str, style: str) -> str:
    if style == "cli":
        return RULES[key].flag
    return f"{'val_fraction' if key == 'fit_val_fraction' else key}="


def _shown(value: int) -> str:
    """A whole number for a message: as written when short, else its first digits and length."""
    text = str(value)
    return text if len(text) <= 15 else f"{text[:3]}... ({len(text.lstrip('-'))} digits)"


def check_option(key: str, value, style: str = "api"):
    """``value`` checked against ``RULES[key]`` (an int or a float), or :class:`InputError`."""
    rule = RULES[key]
    name = _name(key, style)
    what = "a whole number" if rule.kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be {what}, not {value!r}")
    if isinstance(value, numbers.Integral):  # exact, however large (float() of 10**400 fails)
        value = int(value)
        if rule.maximum is not None and value > rule.maximum:
            raise InputError(f"{name} must be at most {rule.maximum:g}, not {_shown(value)}")
    elif not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value!r}")
    elif rule.kind is int and not float(value).is_integer():
        raise InputError(f"{name} must be {what}, not {value!r}")
    value = rule.kind(value)
    lo, hi = rule.minimum, rule.maximum
    if lo is not None and (value <= lo if rule.strict else value < lo):
        need = f"greater than {lo:g}" if rule.strict else f"at least {lo:g}"
        raise InputError(f"{name} must be {need}, not {value:g}")
    if hi is not None and (value >= hi if rule.max_strict else value > hi):
        need = f"less than {hi:g}" if rule.max_strict else f"at most {hi:g}"
        raise InputError(f"{name} must be {need}, not {value:g}")
    return value


def check_options(style: str = "api", **values) -> dict:
    """Check every given (not None) value against its rule; return them converted.

    >>> check_options(batch_size=4, tile_size=None)
    {'batch_size': 4, 'tile_size': None}
    """
    return {k: (None if v is None else check_option(k, v, style)) for k, v in values.items()}
