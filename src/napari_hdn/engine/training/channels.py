"""Training a multi-channel image: one HDN per channel, trained one after the other, each with its
channel's noise model; a resume continues with the channel it stopped in."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.frames import frames_of
from ..data.layout import Layout, layout_of
from ..errors import InputError, StopRequested, SuspiciousNoiseModelWarning
from ..events import EventTask, Reporter, StopFlag
from ..network.loading import load_model
from ..network.multichannel import MultiChannelModel
from ..noise.channels import ChannelNoiseModels, load_noise_model, per_channel_noise, verdict_warnings
from .trainer import Trainer

#: where a multi-channel run keeps its noise models, in its checkpoint folder (for a resume)
NOISE_FILE = "noise-models.hdnoise"


def _relay(callbacks, channel: int, channels: int):
    report = Reporter(EventTask.TRAIN, callbacks)

    def relay(ev):
        ev.metrics = {**(ev.metrics or {}), "channel": channel, "channels": channels}
        for cb in report.callbacks:
            cb(ev)

    return relay


def train_channels(images, noise_model, *, axes: str | None = None, model_config=None,
                   training_config=None, checkpoint_dir=None, callbacks=None,
                   stop_flag: StopFlag | None = None, resume=None, training_overrides=None,
                   channel_names: Sequence[str] | None = None) -> MultiChannelModel:
    """Train one HDN per channel of ``images`` (one after the other); see :func:`~.training.train`.

    Parameters
    ----------
    noise_model : NoiseModel, list or ChannelNoiseModels
        One per channel, or one for all.
    checkpoint_dir : path, optional
        Channel k's checkpoints go to ``checkpoint_dir/channel-k`` (k from 1), and its final
        model, once trained, to ``channel-k/final.hdn``.
    resume : path, optional
        The ``checkpoint_dir`` of an earlier run: finished channels are loaded (or, when
        ``training_overrides`` ask for more ``max_steps`` than they had, trained on from their
        ``last.hdn``), an interrupted one resumes from its ``last.hdn``, the others train from the
        start with the run's noise models.
    training_overrides : dict, optional
        As for :class:`~.training.Trainer`; a ``time_budget_s`` is shared out between the
        channels.

    Events carry ``metrics["channel"]`` (0-based) and ``metrics["channels"]``. A stop ends the
    run: what was trained is kept in the checkpoint folders and :class:`StopRequested` says how
    to continue (unless the stop came in the last channel: the model is then returned, its last
    channel the best so far).
    """

    stop_flag = stop_flag or StopFlag()
    shape = tuple(images.shape) if hasattr(images, "shape") else np.shape(images)
    layout = layout_of(shape, axes, "the training images")
    if not layout.has_channels:
        raise InputError("train_channels needs an image with a channel axis C in its axes")
    n = layout.channels
    base = Path(resume or checkpoint_dir) if (resume or checkpoint_dir) else None
    if noise_model is not None:
        noises = per_channel_noise(noise_model, n)
    elif resume is not None and (base / NOISE_FILE).exists():  # the run's own noise models
        noises = list(load_noise_model(base / NOISE_FILE))
        if len(noises) != n:
            raise InputError(f"{resume} is the checkpoint folder of a run on {len(noises)} "
                             f"channels, not {n}: resume with the image it was trained on")
    else:
        noises = per_channel_noise(noise_model, n)  # raises: a noise model is needed
    if base is not None and noise_model is not None:
        base.mkdir(parents=True, exist_ok=True)
        ChannelNoiseModels(noises).save(base / NOISE_FILE)  # for a resume
    over = dict(training_overrides or {})
    if over.get("time_budget_s"):
        over["time_budget_s"] = float(over["time_budget_s"]) / n
    said = verdict_warnings(ChannelNoiseModels(noises))
    if said:  # once for all channels, before any training (the Trainers say nothing more)
        warnings.warn(said, SuspiciousNoiseModelWarning, stacklevel=2)
    models = []
    arr = images if hasattr(images, "shape") else np.asarray(images)
    for c in range(n):
        ck = base / f"channel-{c + 1}" if base is not None else None
        final = ck / "final.hdn" if ck is not None else None
        if resume is not None and final is not None and final.exists():
            done = load_model(final)
            want = over.get("max_steps")
            if want is None or int(done.info.get("steps") or 0) >= int(want) \
                    or not (ck / "last.hdn").exists():
                models.append(done)  # trained: nothing more asked of it
                continue
        res = ck / "last.hdn" if resume is not None and ck is not None and (ck / "last.hdn").exists() \
            else None
        frames = _channel_frames(arr, layout, c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SuspiciousNoiseModelWarning)
            trainer = Trainer(frames, noises[c] if res is None else None,
                              model_config=model_config if res is None else None,
                              training_config=training_config, checkpoint_dir=ck,
                              callbacks=_relay(callbacks, c, n), resume=res, stop_flag=stop_flag,
                              training_overrides=over)
        model = trainer.run()
        stopped = bool(model.info.get("stopped_early"))
        if not stopped and final is not None:
            model.save(final)
        models.append(model)
        if stopped and c < n - 1:
            where = f"; continue with resume={base}" if base is not None else ""
            raise StopRequested(f"stopped during channel {c + 1} of {n}: channels 1-{c + 1} are "
                                f"in the checkpoint folders{where}")
    info = {"axes": layout.axes, "channels": n,
            "channel_names": list(channel_names) if channel_names else None,
            "steps": [m.info.get("steps") for m in models],
            "stopped_early": bool(models[-1].info.get("stopped_early"))}
    for m in models:
        m.info["axes"] = layout.frame_axes
    return MultiChannelModel(models, info)


def _channel_frames(arr, layout: Layout, c: int):
    return frames_of(arr, layout.frame_axes, channel=(layout.channel_pos, c),
                     name=f"channel {c + 1} of the training images")
