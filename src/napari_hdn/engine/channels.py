"""Images with channels: a noise model and an HDN for each channel, as the paper trains them.

A channel axis ``C`` may stand anywhere among the leading axes (``CYX``, ``TCYX``, ``SCYX``,
``CZYX``) or last, as colour samples (``YXC``, an RGB image; ``TYXC``). Without axes, an array of
shape ``(Y, X, 3)`` or ``(Y, X, 4)`` is taken as RGB(A), as napari takes it.

- :class:`ChannelNoiseModels`: one noise model per channel (fitted per channel: a camera's gain
  and offset may differ between channels, and each channel's signal range does).
- :class:`MultiChannelModel`: one :class:`~.model.HDNModel` per channel in one file; training
  (:func:`train_channels`) runs them one after the other; prediction restores every channel and
  returns the input's layout. Why one HDN per channel rather than one network for all channels:
  docs/real-data.md, "Channels".
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import check_axes
from .errors import InputError, ModelFileError, StopRequested, SuspiciousNoiseModelWarning
from .events import EventTask, Reporter, StopFlag

CHANNEL_FILE_VERSION = 2  # of model and noise-model files holding channels
#: where a multi-channel run keeps its noise models, in its checkpoint folder (for a resume)
NOISE_FILE = "noise-models.hdnoise"


@dataclass(frozen=True)
class Layout:
    """Where the channels of an image are: ``axes`` (with C when there is one), ``frame_axes``
    (those of one channel), ``channel_pos`` (the C axis's position, or None) and ``channels``."""

    axes: str
    frame_axes: str
    channel_pos: int | None
    channels: int

    @property
    def has_channels(self) -> bool:
        return self.channel_pos is not None

    def channel_view(self, image, c: int):
        """Channel ``c`` of ``image`` (a view of a numpy array; an index of a lazy one)."""
        if self.channel_pos is None:
            return image
        key = (slice(None),) * self.channel_pos + (int(c),)
        return image[key]

    def stack(self, per_channel: Sequence[np.ndarray], leading: int = 0) -> np.ndarray:
        """The per-channel results back in this layout (``leading`` extra axes first)."""
        if self.channel_pos is None:
            return per_channel[0]
        return np.stack(per_channel, axis=self.channel_pos + leading)


def looks_rgb(shape) -> bool:
    """(Y, X, 3 or 4) with a real image's sides: what napari opens as RGB(A)."""
    return len(shape) in (3, 4) and shape[-1] in (3, 4) and min(shape[-3:-1]) > 4


def layout_of(shape, axes: str | None = None, name: str = "image") -> Layout:
    """The :class:`Layout` of an image of ``shape`` with ``axes`` (None: guessed).

    Raises
    ------
    InputError
        When the axes do not fit the shape, hold C twice, or put C between Y and X.
    """
    shape = tuple(int(v) for v in shape)
    if axes is None and not looks_rgb(shape):
        full = check_axes(None, shape)
        return Layout(full, full, None, 1)
    ax = (("S" if len(shape) == 4 else "") + "YXC" if axes is None
          else str(axes).upper().replace(" ", ""))
    if "C" not in ax:
        full = check_axes(ax, shape)
        return Layout(full, full, None, 1)
    if ax.count("C") > 1:
        raise InputError(f"axes {axes!r} name the channel axis C more than once")
    if len(ax) != len(shape):
        raise InputError(f"axes {ax!r} have {len(ax)} letters but {name} has {len(shape)} "
                         f"dimensions {shape}")
    pos = ax.index("C")
    rest = ax.replace("C", "")
    if not rest.endswith("YX"):
        raise InputError(f"axes {ax!r} must end with 'YX' (rows, columns), or 'YXC' for colour "
                         "samples")
    if not (ax.endswith("YXC") or pos < len(ax) - 2):
        raise InputError(f"axes {ax!r}: the channel axis C goes before Y and X (CYX, TCYX) or "
                         "after them (YXC, colour samples), not between them")
    sub = shape[:pos] + shape[pos + 1:]
    frame_axes = check_axes(rest, sub)
    return Layout(ax, frame_axes, pos, shape[pos])


# -- noise models ----------------------------------------------------------------------------------


class ChannelNoiseModels(Sequence):
    """One noise model per channel (a sequence of :class:`~.noise.base.NoiseModel`)."""

    kind = "per-channel"

    def __init__(self, models: Sequence) -> None:
        from .noise.base import NoiseModel

        models = list(models)
        if not models or not all(isinstance(m, NoiseModel) for m in models):
            raise InputError("ChannelNoiseModels takes a list of noise models, one per channel")
        self.models = models

    def __getitem__(self, k):
        return self.models[k]

    def __len__(self) -> int:
        return len(self.models)

    @property
    def info(self) -> dict:
        """The verdicts of the channels' fits (``verdict`` is the worst of them)."""
        verdicts = [getattr(m, "info", {}).get("verdict") for m in self.models]
        known = [v for v in verdicts if v]
        worst = ("suspicious" if "suspicious" in known else "good") if known else None
        return {"verdict": worst, "channels": [getattr(m, "info", {}) or {} for m in self.models]}

    def save(self, path: str | os.PathLike) -> None:
        """One file with every channel's model (noise-model format version 2)."""
        from .noise.base import NOISE_FILE_FORMAT
        from .safeio import write_file

        tensors, states = {}, []
        for k, m in enumerate(self.models):
            params, t = m.get_state()
            tensors.update({f"c{k}.{name}": v for name, v in t.items()})
            states.append({"kind": m.kind, "params": params})
        write_file(path, tensors, {"format": NOISE_FILE_FORMAT,
                                   "format_version": CHANNEL_FILE_VERSION, "channels": states})

    def describe(self) -> dict:
        return {"kind": self.kind, "channels": [m.describe() for m in self.models]}

    def __repr__(self) -> str:
        return f"ChannelNoiseModels({', '.join(repr(m) for m in self.models)})"


def noise_models_from_file(meta: dict, tensors: dict, path) -> ChannelNoiseModels:
    """The channels of a version-2 noise-model file (see :func:`~.noise.load_noise_model`)."""
    from .noise.base import noise_model_from_state

    states = meta.get("channels")
    if not isinstance(states, list) or not states:
        raise ModelFileError(f"{path}: the noise-model file says it holds channels but lists none; "
                             "the file is damaged or edited")
    out = []
    for k, st in enumerate(states):
        if not isinstance(st, dict) or not isinstance(st.get("params", {}), dict):
            raise ModelFileError(f"{path}: the noise model of channel {k + 1} is invalid")
        prefix = f"c{k}."
        out.append(noise_model_from_state(str(st.get("kind", "?")), st.get("params", {}),
                                          {n[len(prefix):]: v for n, v in tensors.items()
                                           if n.startswith(prefix)}))
    return ChannelNoiseModels(out)


def per_channel_noise(noise, channels: int) -> list:
    """A noise model for each of ``channels``: a list or :class:`ChannelNoiseModels` of that
    length, or one model (copied to every channel, e.g. a camera's known Poisson-Gaussian law)."""
    from .noise.base import NoiseModel

    if isinstance(noise, NoiseModel):
        return [copy.deepcopy(noise) for _ in range(channels)]
    if isinstance(noise, (list, tuple, ChannelNoiseModels)):
        models = list(noise)
        if len(models) != channels:
            raise InputError(f"{len(models)} noise model(s) for an image with {channels} channels: "
                             "give one noise model per channel (fit one on each channel), or one "
                             "for all")
        return models
    raise InputError("a noise model is required: pass e.g. GaussianNoiseModel(sigma), a fitted noise "
                     "model, or one per channel (ChannelNoiseModels)")


def verdict_warnings(noise) -> str:
    """:func:`~.noise.diagnostics.verdict_warning` of every channel that has one, joined."""
    from .noise.diagnostics import verdict_warning

    if isinstance(noise, ChannelNoiseModels):
        parts = [f"channel {k + 1}: {w}" for k, m in enumerate(noise) if (w := verdict_warning(m))]
        return "; ".join(parts)
    return verdict_warning(noise)


# -- models ----------------------------------------------------------------------------------------


class MultiChannelModel:
    """One trained HDN per channel of a multi-channel image, saved as one file.

    Parameters
    ----------
    models : list of HDNModel
        One per channel, in channel order, all with the same number of latent levels.
    info : dict, optional
        The record of the training (``axes`` with C, ``channel_names``...).
    """

    def __init__(self, models: Sequence, info: dict | None = None) -> None:
        from .model import HDNModel

        models = list(models)
        if len(models) < 2 or not all(isinstance(m, HDNModel) for m in models):
            raise InputError("a MultiChannelModel holds one HDNModel per channel (two or more)")
        if len({m.levels for m in models}) != 1:
            raise InputError("the channels' models must have the same number of latent levels")
        self.models = models
        self.info = dict(info or {})

    # what the single-channel model offers, for code that only needs the architecture
    @property
    def channels(self) -> int:
        return len(self.models)

    @property
    def config(self):
        return self.models[0].config

    @property
    def levels(self) -> int:
        return self.models[0].levels

    @property
    def device(self):
        return self.models[0].device

    @property
    def noise_models(self) -> ChannelNoiseModels:
        return ChannelNoiseModels([m.noise_model for m in self.models])

    def channel(self, k: int):
        """The :class:`~.model.HDNModel` of channel ``k`` (0-based)."""
        if not 0 <= int(k) < self.channels:
            raise InputError(f"channel {k} does not exist: this model has {self.channels} channels "
                             f"(0..{self.channels - 1})")
        return self.models[int(k)]

    def to(self, device) -> MultiChannelModel:
        for m in self.models:
            m.to(device)
        return self

    def resolve_modes(self, modes) -> list[str]:
        out = None
        for m in self.models:
            out = m.resolve_modes(modes)
        return out

    def default_modes(self) -> list[str]:
        return self.models[0].default_modes()

    def predict(self, image, n_samples="auto", **kwargs):
        """Samples, MMSE and variance of every channel; see :func:`napari_hdn.predict`."""
        from .prediction import predict

        return predict(self, image, n_samples=n_samples, **kwargs)

    # -- files ---------------------------------------------------------------------------------
    def file_contents(self) -> tuple[dict, dict]:
        from .model import MODEL_FILE_FORMAT, _package_version

        tensors, channels = {}, []
        for k, m in enumerate(self.models):
            t, meta = m.file_contents()
            tensors.update({f"c{k}.{name}": v for name, v in t.items()})
            channels.append({key: meta[key] for key in ("config", "noise_model", "normalisation",
                                                        "info")})
        meta = {"format": MODEL_FILE_FORMAT, "format_version": CHANNEL_FILE_VERSION,
                "napari_hdn_version": _package_version(), "channels": channels,
                "info": self.info,
                # what a reader of one channel needs to know without parsing the channels
                "config": channels[0]["config"]}
        return tensors, meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write every channel's model to one file (model format version 2), atomically."""
        from .safeio import write_file

        tensors, meta = self.file_contents()
        return write_file(path, tensors, meta)

    def __repr__(self) -> str:
        c = self.config
        return (f"MultiChannelModel({self.channels} channels, levels={c.levels}, z_dim={c.z_dim}, "
                f"filters={c.filters}, blocks={c.blocks})")


def models_from_file(meta: dict, tensors: dict, path) -> MultiChannelModel:
    """The channels of a version-2 model file (see :func:`~.model.load_model`)."""
    from .model import model_from_parts

    channels = meta.get("channels")
    if not isinstance(channels, list) or len(channels) < 2:
        raise ModelFileError(f"{path}: the model file says it holds channels but lists "
                             f"{len(channels) if isinstance(channels, list) else 'none'}; the file "
                             "is damaged or edited")
    models = []
    for k, part in enumerate(channels):
        if not isinstance(part, dict):
            raise ModelFileError(f"{path}: the model of channel {k + 1} is invalid")
        prefix = f"c{k}."
        models.append(model_from_parts(part, {n[len(prefix):]: v for n, v in tensors.items()
                                              if n.startswith(prefix)}, path))
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return MultiChannelModel(models, info)


def check_channels(model, layout: Layout, name: str = "the image") -> None:
    """Refuse an image whose channel count is not the model's, naming both."""
    want = model.channels if isinstance(model, MultiChannelModel) else 1
    have = layout.channels if layout.has_channels else 1
    if want == have:
        return
    if want == 1:
        raise InputError(
            f"the model was trained on one channel, but {name} has {have} channels (axes "
            f"{layout.axes}): predict one channel at a time (select it first), or train a model "
            "on all channels (train with these axes)")
    trained = model.info.get("axes")
    raise InputError(
        f"the model was trained on {want} channels" + (f" (axes {trained})" if trained else "")
        + f", but {name} has {have} channel(s)" + (f" (axes {layout.axes})" if layout.has_channels
                                                    else "")
        + f": give an image with {want} channels and its channel axis C in the axes (e.g. CYX, "
        "or YXC for RGB), or predict one channel with model.channel(k)")


# -- training --------------------------------------------------------------------------------------


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
    from .model import load_model
    from .training import Trainer

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
        from .noise.base import load_noise_model

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
    from .frames import frames_of

    return frames_of(arr, layout.frame_axes, channel=(layout.channel_pos, c),
                     name=f"channel {c + 1} of the training images")
