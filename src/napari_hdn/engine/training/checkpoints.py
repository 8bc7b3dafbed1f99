"""What a checkpoint holds beyond a model file: the optimiser's state, the training settings (and
those of earlier versions, which resume under today's), the step it stopped at, and a fingerprint
of the data it trained on (a resume on other data is said)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings

import numpy as np
import torch

from ..config import TrainingConfig, validated
from ..data.frames import Frame
from ..errors import HDNWarning, InputError, ModelFileError
from ..options import RULES

OPTIM_PREFIX = "optim."


def _optimizer_state_to_file(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Flatten an optimiser state dict into tensors + JSON (safe to store, no pickle)."""
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        entry = {}
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{OPTIM_PREFIX}{pid}.{name}"] = val
            else:
                entry[name] = val
        state_meta[str(pid)] = entry
    return tensors, {"param_groups": sd["param_groups"], "scalars": state_meta}


def _optimizer_state_from_file(meta: dict, tensors: dict) -> dict:
    state: dict = {}
    for key, val in tensors.items():
        if not key.startswith(OPTIM_PREFIX):
            continue
        pid, name = key[len(OPTIM_PREFIX) :].split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_state(path) -> dict:
    """The training state of the checkpoint ``path`` (``step``, ``training_config``,
    ``train_seconds``...) read from its header alone, without its tensors; ``{}`` for a plain
    model file or a file that cannot be read (reading it in full then says what is wrong)."""
    if not os.path.isfile(path):  # os.stat only: a FIFO is never opened (that would block)
        return {}
    try:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
        ck = json.loads(raw.get("checkpoint", "{}"))
    except Exception:  # noqa: BLE001 - any unreadable file: the full read reports it
        return {}
    return ck if isinstance(ck, dict) else {}


#: training settings that earlier versions wrote into checkpoints, each with the value under which
#: a run trained as it does now (None: any value, the field changed nothing but speed)
RETIRED_TRAINING_FIELDS: dict[str, object] = {
    "channels_last": None, "lr_schedule": "plateau", "lr_final_fraction": None,
    "cooldown_fraction": None,
}


def saved_training_config(saved: dict, source=None) -> TrainingConfig:
    """The :class:`TrainingConfig` of the settings a checkpoint saved. Fields of earlier versions
    are dropped; where one made that run train otherwise, a warning names it (when ``source``, the
    checkpoint's path, is given)."""
    if not isinstance(saved, dict):
        return validated(TrainingConfig, saved)
    current = {k: v for k, v in saved.items() if k not in RETIRED_TRAINING_FIELDS}
    for name, same in RETIRED_TRAINING_FIELDS.items():
        if source is not None and same is not None and saved.get(name, same) != same:
            warnings.warn(
                f"{source} was trained with {name} {saved[name]!r}, which this version does not "
                f"have: the run goes on from the checkpoint's learning rate with {name} {same!r}",
                HDNWarning, stacklevel=4)
    return validated(TrainingConfig, current)


def resumed_training_config(ck: dict, training_config: TrainingConfig | None = None,
                            overrides: dict | None = None, source=None) -> TrainingConfig:
    """The settings a resumed run trains with: ``training_config`` when given, else those of the
    checkpoint (its state ``ck``; ``source``: its path, named in warnings), else the defaults;
    ``overrides`` on top."""
    base = training_config
    if base is None:
        saved = (ck or {}).get("training_config")
        base = saved_training_config(saved, source) if saved else None
    base = base or TrainingConfig()
    if overrides:
        base = validated(TrainingConfig, {**base.model_dump(), **overrides})
    return base


def check_steps_left(ck: dict, tcfg: TrainingConfig, path, *, steps_given: bool = True,
                     budget_given: bool = True, style: str = "api") -> None:
    """Refuse (:class:`InputError`) to resume the checkpoint of state ``ck`` with settings under
    which it would train nothing: ``max_steps`` at or below its step, or a time budget it has
    already spent (the budget counts the training time of the whole run). ``steps_given`` /
    ``budget_given``: whether the user chose the limit (else it is the checkpoint's own, and its
    run had ended); ``style`` names the options as the caller's user writes them (``"cli"``)."""
    if not ck:
        return
    check_counters(ck, path)
    cli = style == "cli"
    step = int(ck.get("step", 0) or 0)
    if step >= tcfg.max_steps:
        opt = RULES["max_steps"].flag if cli else "max_steps="
        said = (f"{opt} {tcfg.max_steps}" if cli else f"{opt}{tcfg.max_steps}")
        if steps_given:
            raise InputError(f"the checkpoint {path} is at step {step}; {said} would train "
                             f"nothing: give {opt.rstrip('=')} above {step}")
        raise InputError(f"the checkpoint {path} is at step {step}, the end of its run "
                         f"(max_steps {tcfg.max_steps}): resuming it would train nothing; give "
                         f"{opt.rstrip('=')} above {step} to train on")
    spent = float(ck.get("train_seconds", 0.0) or 0.0)
    budget = tcfg.time_budget_s
    if budget is not None and spent >= budget:
        if cli:
            opt, value, need = RULES["minutes"].flag, f"{budget / 60:g}", f"{spent / 60:.3g}"
            unit = " min"
        else:
            opt, value, need, unit = "time_budget_s=", f"{budget:g}", f"{spent:.4g}", " s"
        said = f"{opt} {value}" if cli else f"{opt}{value}"
        head = (f"the checkpoint {path} has trained for {need}{unit} (the time budget counts the "
                "whole run)")
        if budget_given:
            raise InputError(f"{head}; {said} would train nothing: give {opt.rstrip('=')} above "
                             f"{need}")
        raise InputError(f"{head}, its run's whole budget ({value}{unit}): resuming it would "
                         f"train nothing; give {opt.rstrip('=')} above {need} to train on")


#: frames and the side of the square read from each for :func:`data_fingerprint`
FINGERPRINT_FRAMES, FINGERPRINT_SIDE = 16, 16


def data_fingerprint(frames, stats: tuple[float, float]) -> dict:
    """A cheap record of the training data, to tell other data apart on resume: the frames' count,
    sizes and dtype, the mean and std of every pixel (``stats``, computed anyway), and a hash of
    the pixels of a fixed square at the centre of up to 16 evenly spaced frames (read on demand:
    a few kilobytes of a huge lazy stack)."""
    n = len(frames)
    shapes = sorted({tuple(int(v) for v in f.shape) for f in frames})
    first = frames[0]
    dtype = first.source.dtype if isinstance(first, Frame) else np.asarray(first).dtype
    h = hashlib.sha256()
    for k in np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_FRAMES)).round().astype(int)):
        f = frames[int(k)]
        fh, fw = (int(v) for v in f.shape)
        side = min(FINGERPRINT_SIDE, fh, fw)
        ys, xs = slice((fh - side) // 2, (fh - side) // 2 + side), \
            slice((fw - side) // 2, (fw - side) // 2 + side)
        block = f.read(ys, xs, raw=True) if isinstance(f, Frame) else np.asarray(f)[ys, xs]
        h.update(np.ascontiguousarray(block).tobytes())
    return {"frames": n, "frame_shapes": [list(v) for v in shapes[:8]],
            "distinct_shapes": len(shapes), "dtype": str(np.dtype(dtype)),
            "mean": float(stats[0]), "std": float(stats[1]), "sample_sha256": h.hexdigest()[:32]}


def _same_data(a: dict, b: dict) -> bool:
    keys = ("frames", "frame_shapes", "distinct_shapes", "dtype", "sample_sha256")
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    return all(math.isclose(float(a.get(k, 0.0)), float(b.get(k, 0.0)), rel_tol=1e-6, abs_tol=1e-9)
               for k in ("mean", "std"))


def _data_text(fp: dict) -> str:
    n = fp.get("frames", "?")
    shapes = fp.get("frame_shapes") or []
    size = ("x".join(str(v) for v in shapes[0]) if len(shapes) == 1 and fp.get("distinct_shapes", 1)
            == 1 else "various sizes")
    return (f"{n} frame{'' if n == 1 else 's'} of {size} {fp.get('dtype', '?')}, mean "
            f"{float(fp.get('mean', math.nan)):.5g}, std {float(fp.get('std', math.nan)):.5g}")


def _warn_other_data(path, then: dict, now: dict) -> None:
    a, b = _data_text(then), _data_text(now)
    what = f"then {a}; now {b}" if a != b else f"{a} both times, but other pixel values"
    warnings.warn(
        f"resuming {path} on other data than it was trained on ({what}): the run goes on with the "
        "checkpoint's normalisation on this data; resume with the data it was trained on to "
        "continue that run, or start a new run for this data", HDNWarning, stacklevel=4)


def check_counters(ck: dict, path) -> None:
    """Refuse (:class:`ModelFileError`) a checkpoint whose counters no run can have (a negative
    step, a step beyond the largest ``max_steps``, not a whole number): the file was edited."""
    most = int(RULES["max_steps"].maximum)
    for key in ("step", "epoch", "epochs_since_best"):
        v = ck.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= most:
            shown = v if len(repr(v)) <= 20 else f"{repr(v)[:12]}..."
            raise ModelFileError(f"{path}: the checkpoint's {key} is {shown}, which no run can "
                                 f"have (0 to {most:,}); the file is damaged or was edited")
