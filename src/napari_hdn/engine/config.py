"""Validated configurations of the model and of training.

They are plain pydantic models: they validate on construction, serialise to JSON into model files
and checkpoints, and can be built from a GUI's state or the command line's options.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .options import field_bounds

LATENT_MODES: tuple[str, ...] = ("posterior", "prior-sample", "prior-mean", "zero")
#: modes in which the image does not reach a level (what "switching a level off" means)
OFF_MODES: tuple[str, ...] = LATENT_MODES[1:]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def validation_message(exc: Exception) -> str:
    """The field errors of a pydantic ValidationError on one line."""
    errs = getattr(exc, "errors", None)
    if callable(errs):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs())
    return str(exc)


def validated(cls, data: dict):
    """``cls.model_validate(data)``, with invalid values raised as :class:`InputError`."""
    from pydantic import ValidationError

    from .errors import InputError

    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"invalid {cls.__name__}: {validation_message(exc)}") from None


#: the sizes an architecture may have, (smallest, largest): the one place that bounds them, for
#: the API, the command line, the GUI and every model file read (the paper's HDN is 6 levels of
#: 64 filters, 32 latent channels and 5 blocks; the largest here is some 15 billion parameters,
#: so a model file's description is also checked against the weights it holds before anything
#: is built: :func:`~napari_hdn.engine.network.model.model_from_parts`)
MODEL_LIMITS: dict[str, tuple[int | float, int | float]] = {
    "levels": (1, 10),
    "z_dim": (1, 512),
    "filters": (4, 1024),
    "blocks": (1, 32),
    "free_bits": (0.0, 1e6),
}


def _limited(name: str, default, description: str = "", **kw):
    lo, hi = MODEL_LIMITS[name]
    return Field(default, ge=lo, le=hi, description=description, **kw)


class ModelConfig(_Strict):
    """Architecture of the HDN ladder VAE (paper defaults).

    Each component can be switched off to reproduce the paper's ablations (Table 2). Sizes are
    bounded by :data:`MODEL_LIMITS`.
    """

    levels: int = _limited("levels", 6, "Number of latent levels L (z_1 bottom, z_L top).")
    z_dim: int = _limited("z_dim", 32, "Latent channels per level.")
    filters: int = _limited("filters", 64, "Feature channels F of every block.")
    blocks: int = _limited("blocks", 5, "Residual blocks per level (B).")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    batchnorm: bool = True
    gated: bool = True
    generative_skip: bool = True
    learned_top_prior: bool = True
    free_bits: float = _limited("free_bits", 1.0, "Free bits in nats per level and sample.")
    deactivated_levels: list[int] = Field(
        default_factory=list,
        description="Levels (1..L) trained with z from the top-down side only (paper's HDN_3-6).",
    )
    withheld_mode: Literal["prior-sample", "prior-mean"] = Field(
        "prior-sample",
        description="Where z of a deactivated level comes from, in training and by default in "
        "prediction: drawn from the prior p(z_i | z_>i) (the reference's training) or its mean "
        "(files written before this option existed were trained with the mean).",
    )

    @model_validator(mode="after")
    def _check_levels(self) -> ModelConfig:
        bad = [lv for lv in self.deactivated_levels if not 1 <= lv <= self.levels]
        if bad:
            raise ValueError(f"deactivated_levels {bad} outside 1..{self.levels}")
        if len(set(self.deactivated_levels)) == self.levels:
            raise ValueError("at least one level must stay active during training")
        return self

    @property
    def downscale(self) -> int:
        """Factor by which the top level is smaller than the input (2**L)."""
        return 2**self.levels


class TrainingConfig(_Strict):
    """Settings of one training run (optimiser, schedule, patches, stopping)."""

    patch_size: int = Field(64, **field_bounds("patch_size"))
    batch_size: int = Field(64, **field_bounds("batch_size"))
    bn_chunk: int = Field(
        8, ge=1, description="BatchNorm statistics are computed per chunk of this many patches."
    )
    micro_batch: int | None = Field(
        None,
        ge=1,
        description="Patches per forward/backward pass; gradients are accumulated over the batch. "
        "None: on CPU 512 / filters in whole BatchNorm chunks (the fastest pass size there), on "
        "GPUs the whole batch.",
    )
    max_steps: int = Field(20000, **field_bounds("max_steps"))
    time_budget_s: float | None = Field(
        None, gt=0.0, description="Stop after this many seconds of training (None: no time limit)."
    )
    steps_per_epoch: int | None = Field(
        100, **field_bounds("steps_per_epoch"),
        description="Optimizer steps between validations (and checkpoints). A fixed "
        "count, not a pass over the data: on small data a pass is a few steps, which made the "
        "plateau and early-stopping patience fire after a few hundred steps. None: 100."
    )
    val_fraction: float = Field(0.1, **field_bounds("val_fraction"))
    val_patches: int = Field(64, ge=1, le=100000, description="Most validation patches per check.")
    lr: float = Field(3e-4, **field_bounds("lr"), description="Peak learning rate (Adamax).")
    warmup_steps: int = Field(
        0, ge=0, description="Steps over which the learning rate rises linearly to ``lr``."
    )
    ema_decay: float | None = Field(
        None, ge=0.0, lt=1.0, description="Exponential moving average of the weights (and BatchNorm "
        "statistics) with this decay, used for validation, checkpoints and the returned model; None "
        "uses the raw weights."
    )
    lr_patience: int = Field(10, ge=1, description="Epochs without improvement before lr halves.")
    lr_factor: float = Field(0.5, gt=0.0, lt=1.0)
    early_stopping_patience: int | None = Field(30, ge=1)
    grad_clip: float | None = Field(None, **field_bounds("grad_clip"))
    max_bad_batches: int = Field(
        20, ge=1, description="Consecutive non-finite losses tolerated before training stops."
    )
    augment: bool = True
    init: str = Field(
        "scratch", min_length=1, description="Where a new run starts: 'scratch' (a fresh network), "
        "'prior' (the bundled prior pretrained on other images, for the architecture it fits; see "
        "engine/priors.py) or the path of a .hdn model file of the same architecture. Only weights "
        "are taken: the noise model and normalisation are the new data's. Ignored when resuming."
    )
    seed: int | None = 0
    device: str = "auto"
    threads: int | None = Field(
        None, **field_bounds("threads"),
        description="CPU threads for training. None: start with torch's count "
        "(the cores) and adapt to a busy machine (fewer threads while another job competes for "
        "the cores; see engine/threads.py). A number fixes the count."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        from .device import DEVICE_CHOICES

        if v.split(":")[0].lower() not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, not {v!r}")
        return v.lower()


def validate_level_modes(levels: int, modes) -> list[str]:
    """Normalise a per-level latent-mode specification to a list of ``levels`` mode strings.

    ``modes`` may be None (all "posterior"), a list/tuple of L modes (index 0 = level 1), or a dict
    ``{level: mode}`` with levels numbered 1..L as in the paper.
    """
    if modes is None:
        return ["posterior"] * levels
    if isinstance(modes, dict):
        out = ["posterior"] * levels
        for lv, mode in modes.items():
            lv = int(lv)
            if not 1 <= lv <= levels:
                raise ValueError(f"latent level {lv} does not exist: this model has levels 1..{levels}")
            out[lv - 1] = _check_mode(mode)
        return out
    modes = list(modes)
    if len(modes) != levels:
        raise ValueError(f"expected {levels} latent modes (one per level), got {len(modes)}")
    return [_check_mode(m) for m in modes]


def _check_mode(mode: str) -> str:
    m = str(mode).lower().replace("_", "-")
    if m == "prior":
        m = "prior-mean"
    if m not in LATENT_MODES:
        raise ValueError(f"unknown latent mode {mode!r}: use one of {', '.join(LATENT_MODES)}")
    return m
