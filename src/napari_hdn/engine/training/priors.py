"""Where a new training run starts: from scratch, from the bundled prior, or from a model file.

HDN learns the images' signal prior (the top-down path and the decoder) from the noisy data alone.
With a few images and minutes of CPU that prior is starved: the network spends its first thousand
steps learning what edges and blobs look like. napari-hdn ships a *prior*: the fast preset's
network pretrained on images that no benchmark scores (scikit-image's other bundled photographs
and generated fluorescence phantoms; ``python scripts/build_prior.py`` makes it and the file's
``info["prior"]`` records how). A run that starts from it takes only the weights: the noise
model and the normalisation are the new data's own, and every weight goes on training.

``TrainingConfig.init`` chooses: ``"scratch"``, ``"prior"`` (the bundled prior whose architecture
fits the model; an error names the fix when none does) or the path of a ``.hdn`` model file (a
model trained earlier on similar data; its architecture must fit).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import InputError
from ..network.ladder import LadderVAE

PRIORS_DIR = Path(__file__).resolve().parents[2] / "priors"
#: the bundled priors, by file name
BUNDLED = ("fast-cpu.hdn",)
INIT_CHOICES = ("scratch", "prior")


def _layout(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple]]:
    """The weights in order, each as (name with its numeric parts blanked, shape). Dropout is a
    module without weights: a network with it and one without differ only in the numbering of the
    modules after it, which this layout ignores."""
    return [(re.sub(r"(?<=\.)\d+(?=\.|$)", "#", k), tuple(v.shape)) for k, v in state.items()]


@lru_cache(maxsize=8)
def _architecture(config_json: str) -> tuple[list[str], list[tuple[str, tuple]]]:
    """(weight names, layout) of a network of this architecture."""
    state = LadderVAE(ModelConfig.model_validate_json(config_json)).state_dict()
    return list(state), _layout(state)


def _weights_for(config: ModelConfig, state: dict[str, torch.Tensor]):
    """``state`` under the weight names of a network of ``config``, or None if it does not fit
    (other sizes or other options; dropout, free bits and withheld levels change no weight)."""
    names, layout = _architecture(config.model_dump_json())
    if _layout(state) != layout:
        return None
    return {name: v.clone() for name, v in zip(names, state.values())}


@lru_cache(maxsize=4)
def _read_bundled(name: str):
    from ..network.model import read_model_file

    return read_model_file(PRIORS_DIR / name)[0]


def bundled_priors() -> list[tuple[str, ModelConfig, dict]]:
    """``(file name, architecture, info)`` of each prior shipped with the package."""
    out = []
    for name in BUNDLED:
        model = _read_bundled(name)
        out.append((name, model.config, dict(model.info.get("prior", {}))))
    return out


#: settings that change no weight (dropout only renumbers the modules after it; see _layout)
_WEIGHTLESS = {"dropout", "free_bits", "deactivated_levels", "withheld_mode"}


def _sizes(config: ModelConfig) -> dict:
    return {k: v for k, v in config.model_dump().items() if k not in _WEIGHTLESS}


def bundled_prior_for(config: ModelConfig) -> str | None:
    """The file name of the bundled prior whose weights fit ``config``; None if none does."""
    for name in BUNDLED:
        # reading the file checked its weights against its own architecture, so the same sizes
        # mean the weights fit (the widget asks on every edit of the sizes)
        if _sizes(config) == _sizes(_read_bundled(name).config):
            return name
    return None


def _describe(cfg: ModelConfig) -> str:
    off = [name for name in ("batchnorm", "gated", "generative_skip", "learned_top_prior")
           if not getattr(cfg, name)]
    return (f"levels {cfg.levels}, z {cfg.z_dim}, filters {cfg.filters}, blocks {cfg.blocks}"
            + "".join(f", no {name.replace('_', ' ')}" for name in off))


def initial_weights(init: str, config: ModelConfig) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The weights a new run of architecture ``config`` starts from, and a record for the model's
    info. ``(None, {"init": "scratch"})`` for a fresh network."""
    if init == "scratch":
        return None, {"init": "scratch"}
    if init == "prior":
        name = bundled_prior_for(config)
        if name is None:
            fits = "; ".join(_describe(c) for _, c, _ in bundled_priors())
            raise InputError(
                f"no bundled prior fits this architecture ({_describe(config)}): the bundled "
                f"prior is for {fits} (the 'fast CPU' preset). Train from scratch (init='scratch', "
                "`--init scratch`, or 'Start from: scratch' in the Training widget) or use "
                "those sizes."
            )
        model = _read_bundled(name)
        digest = hashlib.sha256((PRIORS_DIR / name).read_bytes()).hexdigest()
        record = {"init": "prior", "file": name, "sha256": digest,
                  "prior": dict(model.info.get("prior", {}))}
        return _weights_for(config, model.ladder.state_dict()), record
    from ..network.loading import load_model

    path = Path(init)
    if not path.is_file():
        raise InputError(
            f"init={init!r} is neither 'scratch', 'prior' nor an existing model file: give "
            "'scratch', 'prior' or the path of a .hdn model trained earlier"
        )
    model = load_model(path)
    weights = _weights_for(config, model.ladder.state_dict())
    if weights is None:
        raise InputError(
            f"the model {path} ({_describe(model.config)}) does not fit this run's architecture "
            f"({_describe(config)}): start from a model of the same sizes and options, or from "
            "scratch"
        )
    return (weights,
            {"init": "model file", "file": str(path.resolve()),
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
