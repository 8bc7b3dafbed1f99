"""Reading a model from a file: a napari-hdn ``.hdn`` file (one model, or one per channel) or a
BioImage Model Zoo package that napari-hdn exported (the zip is read with the standard library and
the weights with ``torch.load(weights_only=True)``: nothing in a file runs code)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import HDNError, ModelFileError
from ..files.safeio import read_file
from ..noise.channels import CHANNEL_FILE_VERSION
from .model import MODEL_FILE_FORMAT, MODEL_FILE_VERSION, model_from_parts
from .multichannel import models_from_file

#: the key under a BMZ package's ``config`` that marks a napari-hdn export
CONFIG_KEY = "napari_hdn"
#: the architecture that every napari-hdn package names (:class:`napari_hdn.engine.bmz.HDNBioimageModel`)
ARCH_MODULE = "napari_hdn.engine.bmz"
ARCH_CALLABLE = "HDNBioimageModel"
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")


class MissingBMZ(HDNError, ImportError):
    """bioimageio.spec / bioimageio.core (or PyYAML, to read a package) are not installed."""


def load_model(path: str | os.PathLike, device=None):
    """Load a napari-hdn model file: an :class:`HDNModel`, or a
    :class:`~napari_hdn.engine.network.multichannel.MultiChannelModel` for a file with one model per channel.

    Raises
    ------
    ModelFileError
        If the file is missing, unreadable, truncated, corrupt, not a napari-hdn model (a .hdn file
        or a BioImage Model Zoo package that napari-hdn exported), of a newer
        version, or holds values no model can have (NaN or infinite weights, a normalisation std
        that is not a positive finite number, metadata of the wrong types).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ModelFileError(f"load_model expects the path of a model file, not "
                             f"{type(path).__name__}")
    if str(path).lower().endswith(".zip") or is_bmz_package(path):  # a BioImage Model Zoo package
        return load_bmz(path, device=device)
    meta, tensors = read_file(path, MODEL_FILE_FORMAT, "napari-hdn model")
    version = meta.get("format_version")
    if version == CHANNEL_FILE_VERSION and isinstance(meta.get("channels"), list):
        model = models_from_file(meta, tensors, path)
    else:
        if not isinstance(version, int) or version > MODEL_FILE_VERSION:
            raise ModelFileError(
                f"{path} has model format version {version}; this napari-hdn reads up to "
                f"{CHANNEL_FILE_VERSION}. Update napari-hdn to load it.")
        model = model_from_parts(meta, tensors, path)
    if device is not None:
        model.to(resolve_device(device))
    return model


# -- import ---------------------------------------------------------------------------------------
def is_bmz_package(path) -> bool:
    """Whether ``path`` is a zip file with a bioimage.io description (not whether it is an HDN)."""
    p = Path(path)
    try:
        if not p.is_file() or not zipfile.is_zipfile(p):
            return False
        with zipfile.ZipFile(p) as z:
            return any(n in z.namelist() for n in RDF_NAMES)
    except OSError:
        return False


def _read_rdf(z: zipfile.ZipFile, path) -> dict:
    try:
        import yaml
    except ImportError:
        raise MissingBMZ("reading a BioImage Model Zoo package needs PyYAML: pip install "
                         "\"napari-hdn[bmz]\" (or pip install pyyaml)") from None
    name = next((n for n in RDF_NAMES if n in z.namelist()), None)
    if name is None:
        raise ModelFileError(f"{path} is a zip without rdf.yaml: not a BioImage Model Zoo package")
    try:
        rdf = yaml.safe_load(z.read(name))
    except Exception as exc:  # noqa: BLE001 - any YAML error: one line
        what = " ".join(str(exc).split())[:200]
        raise ModelFileError(f"{path}: its {name} is not valid YAML ({what})") from None
    if not isinstance(rdf, dict):
        raise ModelFileError(f"{path}: its {name} is not a bioimage.io description")
    return rdf


def _hdn_weights(rdf: dict, path) -> tuple[dict, dict]:
    """(pytorch_state_dict entry, architecture kwargs) of an HDN package, or a one-line refusal."""
    kind = rdf.get("type")
    if kind != "model":
        raise ModelFileError(f"{path} is a BioImage Model Zoo {kind or 'resource'}, not a model")
    weights = rdf.get("weights") or {}
    sd = weights.get("pytorch_state_dict") if isinstance(weights, dict) else None
    arch = (sd or {}).get("architecture") or {}
    cfg = (rdf.get("config") or {}).get(CONFIG_KEY)
    if not (isinstance(arch, dict) and arch.get("import_from") == ARCH_MODULE
            and arch.get("callable") == ARCH_CALLABLE and isinstance(cfg, dict)):
        name = rdf.get("name") or "this model"
        formats = ", ".join(sorted(weights)) if isinstance(weights, dict) else "none"
        found = (f"{arch.get('import_from')}.{arch.get('callable')}" if isinstance(arch, dict)
                 and arch.get("callable") else f"weights: {formats}")
        raise ModelFileError(f"{path} ({name}) is a BioImage Model Zoo model but not an HDN "
                             f"exported by napari-hdn ({found}); napari-hdn predicts only its own "
                             "HDN packages")
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs.get("model_meta"), dict):
        raise ModelFileError(f"{path}: the HDN package holds no model description; it is damaged "
                             "or was edited")
    return sd, kwargs


def load_bmz(path, device=None):
    """The :class:`~napari_hdn.engine.network.model.HDNModel` of a package written by :func:`export_bmz`.

    Raises
    ------
    ModelFileError
        If the file is not a zip with a bioimage.io description, not a model, not an HDN
        exported by napari-hdn, or its weights are missing or damaged.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            rdf = _read_rdf(z, p)
            sd, kwargs = _hdn_weights(rdf, p)
            source = sd.get("source")
            if not isinstance(source, str) or source not in z.namelist():
                raise ModelFileError(f"{p}: the weights file {source!r} named by rdf.yaml is not "
                                     "in the package")
            raw = z.read(source)
    except zipfile.BadZipFile as exc:
        raise ModelFileError(f"{p} is not a valid zip file ({exc})") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign weights file: one line
        raise ModelFileError(f"{p}: its weights {source} cannot be read as a state dict "
                             f"({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{p}: its weights {source} are not a dict of tensors")
    model = model_from_parts(kwargs["model_meta"], state, p)
    model.info = {**model.info, "bmz": {"package": str(p), "name": rdf.get("name"),
                                        "n_samples": kwargs.get("n_samples"),
                                        "seed": kwargs.get("seed")}}
    if device is not None:
        model.to(resolve_device(device))
    return model
