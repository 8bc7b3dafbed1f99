"""One-call training: :func:`train` (one HDN, or one per channel) and :func:`fine_tune` (a trained
model trained on, e.g. with artefact levels withheld)."""

from __future__ import annotations

import os

import numpy as np

from ..config import ModelConfig, TrainingConfig, validated
from ..data.layout import layout_of
from ..errors import (
    InputError,
    OptionError,
)
from ..events import Callback, StopFlag
from ..network.model import HDNModel
from ..noise.base import NoiseModel
from ..noise.channels import ChannelNoiseModels
from .channels import train_channels
from .trainer import Trainer


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    m_keys, t_keys = set(ModelConfig.model_fields), set(TrainingConfig.model_fields)
    m, t = {}, {}
    for k, v in overrides.items():
        if k in m_keys:
            m[k] = v
        elif k in t_keys:
            t[k] = v
        else:
            raise OptionError(
                f"unknown training option {k!r}; model options: {sorted(m_keys)}; "
                f"training options: {sorted(t_keys)}"
            )
    return m, t


def train(
    images,
    noise_model: NoiseModel | None = None,
    *,
    axes: str | None = None,
    model_config: ModelConfig | None = None,
    training_config: TrainingConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    callbacks: Callback | list[Callback] | None = None,
    resume: str | os.PathLike | None = None,
    stop_flag: StopFlag | None = None,
    **options,
) -> HDNModel:
    """Train a Hierarchical DivNoising model on noisy images (no clean data needed).

    Parameters
    ----------
    images : ndarray or list of ndarray
        Noisy images: YX, a stack of frames (SYX/TYX) or a volume treated slice-wise (ZYX); with
        a channel axis C (``CYX``, ``TCYX``, ``YXC`` for RGB) one HDN is trained per channel and
        a :class:`~napari_hdn.engine.network.multichannel.MultiChannelModel` returned. A memory-mapped,
        dask or zarr array is read patch by patch, never copied whole.
    noise_model : NoiseModel or ChannelNoiseModels
        Pixel noise model in the units of ``images``, e.g. ``GaussianNoiseModel(sigma=25)``; for
        channels one per channel (or one for all).
    axes : str, optional
        Axes of ``images`` when ambiguous (e.g. ``"TYX"``, ``"ZYX"``, ``"CYX"``); an array of
        shape (Y, X, 3) is taken as RGB.
    model_config, training_config : ModelConfig, TrainingConfig, optional
        Full configurations; individual fields can also be given as keyword ``options``
        (e.g. ``levels=3, max_steps=500, patch_size=64, device="cpu", seed=0``).
    checkpoint_dir, callbacks, resume, stop_flag
        See :class:`Trainer`.

    Returns
    -------
    HDNModel
        The model with the best validation loss, in eval mode.

    Examples
    --------
    >>> model = napari_hdn.train(noisy, GaussianNoiseModel(25.0), levels=3, max_steps=200)
    >>> result = model.predict(noisy, n_samples=100)
    >>> result.mmse.shape == noisy.shape
    True
    """
    config, training = model_config, training_config
    m_over, t_over = _split_overrides(options)
    if m_over:
        config = validated(ModelConfig, {**(config or ModelConfig()).model_dump(), **m_over})

    shape = np.shape(images) if not isinstance(images, (list, tuple)) else None
    layout = layout_of(shape, axes) if shape is not None else None
    if (layout is not None and layout.has_channels) or isinstance(noise_model, ChannelNoiseModels):
        if layout is None or not layout.has_channels:
            raise InputError("one noise model per channel was given, but the images have no "
                             "channel axis: give their axes with C (e.g. 'CYX', 'YXC')")
        return train_channels(images, noise_model, axes=layout.axes, model_config=config,
                              training_config=training, checkpoint_dir=checkpoint_dir,
                              callbacks=callbacks, stop_flag=stop_flag, resume=resume,
                              training_overrides=t_over)
    trainer = Trainer(
        images,
        noise_model,
        axes=axes,
        model_config=config if (resume is None or m_over) else None,
        training_config=training,
        checkpoint_dir=checkpoint_dir,
        callbacks=callbacks,
        resume=resume,
        stop_flag=stop_flag,
        training_overrides=t_over,
    )
    return trainer.run()


#: fine-tuning's learning rate: below the fast preset's peak (5e-3), as the weights are trained
FINE_TUNE_LR = 1e-3


def fine_tune(
    model: HDNModel,
    images,
    levels,
    *,
    steps: int = 300,
    axes: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    callbacks: Callback | list[Callback] | None = None,
    stop_flag: StopFlag | None = None,
    **options,
) -> HDNModel:
    """Train a trained model on for ``steps`` steps with latent ``levels`` withheld from the image.

    The paper removes line artefacts with a model trained from scratch with the bottom levels
    deactivated (``HDN_3-6``). Starting from a model already trained with every level active is far
    cheaper: the upper levels and the decoder are trained, and a few hundred steps teach the
    decoder to work with the withheld levels drawn from their prior (``withheld_mode``), the
    setting the model then predicts with by default.

    Parameters
    ----------
    model : HDNModel
        A trained model (not changed).
    images : the noisy training data (as for :func:`train`; usually the data the model was trained
        on).
    levels : list of int
        Levels (1..L) to withhold; those already withheld in ``model`` stay withheld.
    steps : int
        Optimiser steps (``max_steps``).
    options : TrainingConfig fields, e.g. ``lr`` (default :data:`FINE_TUNE_LR`), ``batch_size``,
        ``device``, ``seed``, ``threads``, ``time_budget_s``.

    Returns
    -------
    HDNModel
        The fine-tuned model; ``info["fine_tuned"]`` records the levels, steps and the start.
    """
    if not isinstance(model, HDNModel):
        raise InputError(f"fine_tune needs a trained HDNModel, not {type(model).__name__}")
    try:
        new = sorted({int(v) for v in levels})
    except (TypeError, ValueError):
        raise InputError(f"levels must be level numbers such as [1, 2], not {levels!r}") from None
    if not new:
        raise InputError("no levels to withhold: give the levels to switch off, e.g. [1] or [1, 2] "
                         "(describe_levels suggests them)")
    cfg = validated(ModelConfig, {**model.config.model_dump(), "deactivated_levels": sorted(
        set(model.config.deactivated_levels) | set(new))})
    saved = model.info.get("training_config") or {}
    base = {k: v for k, v in saved.items() if k in TrainingConfig.model_fields}
    tc = {**base, "lr": FINE_TUNE_LR, "warmup_steps": min(20, steps),
          "max_steps": int(steps), "time_budget_s": None, **options}
    start = HDNModel(cfg, model.noise_model, model.normalisation, model.ladder, model.info)
    trainer = Trainer(images, None, axes=axes, training_config=validated(TrainingConfig, tc),
                      checkpoint_dir=checkpoint_dir, callbacks=callbacks, stop_flag=stop_flag,
                      initial_model=start)
    out = trainer.run()
    out.info["fine_tuned"] = {"levels": new, "steps": trainer.step,
                              "from_steps": model.info.get("steps")}
    return out
