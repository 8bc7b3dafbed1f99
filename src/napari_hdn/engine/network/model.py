"""HDNModel: the trained ladder VAE together with its noise model and normalisation.

It is what training returns, what a model file holds and what prediction runs. One file (safetensors
+ JSON metadata) stores config, weights, noise-model parameters and normalisation; loading it never
executes code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ModelConfig, validate_level_modes, validation_message
from ..data.arrays import Normalisation
from ..errors import InputError, ModelFileError
from ..files.safeio import check_finite_tensors, finite_number, read_file, write_file
from ..noise.base import NoiseModel, noise_model_from_state
from .ladder import LadderVAE, free_bits_kl, pad_to_multiple

MODEL_FILE_FORMAT = "napari-hdn-model"
MODEL_FILE_VERSION = 1


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("napari-hdn")
    except Exception:
        return "unknown"


class HDNModel:
    """A Hierarchical DivNoising model ready to train further or to predict.

    Parameters
    ----------
    config : ModelConfig
        Architecture.
    noise_model : NoiseModel
        Pixel noise model p(x | s) in raw intensity units.
    normalisation : Normalisation
        Mean/std of the training data.
    ladder : LadderVAE, optional
        Network with weights; a freshly initialised one when omitted.
    info : dict, optional
        JSON-able training record (steps, losses, versions, axes) stored in the file.
    """

    def __init__(
        self,
        config: ModelConfig,
        noise_model: NoiseModel,
        normalisation: Normalisation,
        ladder: LadderVAE | None = None,
        info: dict | None = None,
    ):
        if not isinstance(noise_model, NoiseModel):
            raise InputError(
                f"noise_model must be a napari_hdn NoiseModel (e.g. GaussianNoiseModel(sigma)), got "
                f"{type(noise_model).__name__}"
            )
        self.config = config
        self.noise_model = noise_model
        self.normalisation = normalisation
        self.ladder = ladder if ladder is not None else LadderVAE(config)
        self.info = dict(info or {})

    # -- basic properties ---------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return self.config.levels

    @property
    def device(self) -> torch.device:
        return next(self.ladder.parameters()).device

    def to(self, device) -> HDNModel:
        self.ladder.to(device)
        self.noise_model.to(device)
        return self

    def default_modes(self) -> list[str]:
        """Per-level modes used when none are given: levels deactivated in training stay off."""
        off = self.config.withheld_mode
        return [off if (i + 1) in self.config.deactivated_levels else "posterior"
                for i in range(self.levels)]

    def resolve_modes(self, modes) -> list[str]:
        """Validate per-level modes (list of L, or dict {level: mode}; None = default)."""
        try:
            out = self.default_modes() if modes is None else validate_level_modes(self.levels, modes)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        for lv in self.config.deactivated_levels:
            if out[lv - 1] == "posterior":
                raise InputError(
                    f"level {lv} was deactivated during training, so its posterior was never "
                    "trained: use 'prior-sample', 'prior-mean' or 'zero' for it"
                )
        return out

    # -- objective -----------------------------------------------------------------------------
    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negative ELBO per pixel for a batch of normalised patches (B, 1, H, W).

        Returns ``(loss, reconstruction, kl_per_level)`` where ``kl_per_level`` (L,) is the batch
        mean of each level's KL in nats (before free bits). The KL term of the loss is
        ``mean_b sum_l max(KL_lb, free_bits) / (H*W)`` over active levels.
        """
        cfg = self.config
        modes = self.default_modes()
        xp, (h, w) = pad_to_multiple(x, cfg.downscale)
        s, kls = self.ladder.top_down(self.ladder.bottom_up(xp), modes, compute_kl=True)
        s = s[..., :h, :w]
        norm = self.normalisation
        # the noise model lives in raw intensity space: de-normalise both sides
        ll = self.noise_model.log_likelihood(norm.inverse(x), norm.inverse(s))
        recon = -ll.mean()
        active = [k for k in kls if k is not None]
        kl_stack = torch.stack(active)  # (active levels, B)
        kl_term = free_bits_kl(kl_stack, cfg.free_bits).mean() / (h * w)
        kl_levels = torch.stack(
            [k.detach().mean() if k is not None else torch.zeros((), device=x.device) for k in kls]
        )
        return recon + kl_term, recon.detach(), kl_levels

    # -- prediction ----------------------------------------------------------------------------
    def predict(self, image, n_samples="auto", **kwargs):
        """Posterior samples, MMSE and variance of ``image``; see :func:`napari_hdn.predict`."""
        from ..prediction.run import predict

        return predict(self, image, n_samples=n_samples, **kwargs)

    def sampler(self, image, origin: tuple[int, int] = (0, 0), device=None, reuse_mb: float = 64.0):
        """A :class:`PosteriorSampler` with the bottom-up pass of a 2D ``image`` cached, for
        repeated sampling: it also keeps up to ``reuse_mb`` MiB of top-down states, so a call that
        changes only lower levels' modes does not recompute the levels above."""
        from ..prediction.sampling import PosteriorSampler

        return PosteriorSampler(self, image, origin=origin, device=device, reuse_mb=reuse_mb)

    # -- files ---------------------------------------------------------------------------------
    def file_contents(self) -> tuple[dict[str, torch.Tensor], dict]:
        nm_params, nm_tensors = self.noise_model.get_state()
        tensors = {f"ladder.{k}": v for k, v in self.ladder.state_dict().items()}
        tensors.update({f"noise.{k}": v for k, v in nm_tensors.items()})
        meta = {
            "format": MODEL_FILE_FORMAT,
            "format_version": MODEL_FILE_VERSION,
            "napari_hdn_version": _package_version(),
            "config": self.config.model_dump(),
            "noise_model": {"kind": self.noise_model.kind, "params": nm_params},
            "normalisation": self.normalisation.to_dict(),
            "info": self.info,
        }
        return tensors, meta

    def save(self, path: str | os.PathLike, extra_tensors=None, extra_meta=None) -> Path:
        """Write the model to one file (atomically). Returns the path."""
        tensors, meta = self.file_contents()
        tensors.update(extra_tensors or {})
        meta.update(extra_meta or {})
        return write_file(path, tensors, meta)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"HDNModel(levels={c.levels}, z_dim={c.z_dim}, filters={c.filters}, blocks={c.blocks}, "
            f"noise_model={self.noise_model!r})"
        )


def read_model_file(path) -> tuple[HDNModel, dict, dict]:
    """Load a one-channel model file; return ``(model, meta, tensors)`` (the extras serve
    checkpoints). A file of a multi-channel model is refused (see :func:`load_model`)."""
    meta, tensors = read_file(path, MODEL_FILE_FORMAT, "napari-hdn model")
    version = meta.get("format_version")
    if isinstance(version, int) and version == 2 and isinstance(meta.get("channels"), list):
        raise ModelFileError(
            f"{path} holds a multi-channel model ({len(meta['channels'])} channels): load it with "
            "load_model; to continue its training, resume from its checkpoint folder")
    if not isinstance(version, int) or version > MODEL_FILE_VERSION:
        raise ModelFileError(
            f"{path} has model format version {version}; this napari-hdn reads up to "
            f"{MODEL_FILE_VERSION}. Update napari-hdn to load it."
        )
    return model_from_parts(meta, tensors, path), meta, tensors


def model_from_parts(meta: dict, tensors: dict, path) -> HDNModel:
    """An :class:`HDNModel` from the description and the tensors of one model in a file."""
    for key, kind in (("config", dict), ("noise_model", dict), ("normalisation", dict),
                      ("info", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise ModelFileError(f"{path}: the model description is invalid ({key} is a "
                                 f"{type(meta[key]).__name__}, not a {kind.__name__}); the file "
                                 "is damaged or was edited.")
    try:
        cfg = meta["config"]
        if isinstance(cfg, dict) and "withheld_mode" not in cfg:  # written before the option
            cfg = {**cfg, "withheld_mode": "prior-mean"}  # and trained that way
        config = ModelConfig.model_validate(cfg)
        nm = meta["noise_model"]
        norm_meta = meta["normalisation"]
        norm = Normalisation(finite_number(norm_meta.get("mean"), "the normalisation mean", path),
                             finite_number(norm_meta.get("std"), "the normalisation std", path,
                                           positive=True))
    except ModelFileError:
        raise
    except Exception as exc:
        why = " ".join(validation_message(exc).split())  # one line, a pydantic error's too
        raise ModelFileError(f"{path}: the model description is invalid ({why}).") from None
    params = nm.get("params", {})
    if not isinstance(params, dict):
        raise ModelFileError(f"{path}: the noise model's parameters are invalid (a "
                             f"{type(params).__name__}, not a dict); the file is damaged or edited.")
    check_finite_tensors(tensors, path, "model")
    noise = noise_model_from_state(
        nm.get("kind", "?"),
        params,
        {k[6:]: v for k, v in tensors.items() if k.startswith("noise.")},
    )
    weights = {k[7:]: v for k, v in tensors.items() if k.startswith("ladder.")}
    ladder = _ladder_for(config, weights, path)
    try:
        ladder.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelFileError(
            f"{path}: weights do not match the stored architecture ({first}); the file is damaged "
            "or was edited."
        ) from None
    empty = [n for n, t in (*ladder.named_parameters(), *ladder.named_buffers()) if t.is_meta]
    if empty:  # a tensor the file does not fill (none is expected: strict loading names them)
        raise ModelFileError(f"{path}: weights do not match the stored architecture ({empty[0]} "
                             "is not in the file); the file is damaged or was edited.")
    model = HDNModel(config, noise, norm, ladder, meta.get("info") or {})
    model.ladder.eval()
    return model


def _ladder_for(config: ModelConfig, weights: dict, path) -> LadderVAE:
    """The network ``config`` describes, without memory (torch's meta device), once the weights of
    the file are checked to fit it: a description that claims another network than the file
    holds (an edited header claiming 10 levels of 1024 filters) is refused before anything is
    allocated. The caller loads ``weights`` into it with ``assign=True`` (no second copy);
    floating-point weights of another precision are converted to the network's here."""
    with torch.device("meta"):
        ladder = LadderVAE(config)
    want = ladder.state_dict()
    claimed = sum(t.numel() for t in want.values())
    held = sum(t.numel() for t in weights.values())
    if claimed != held:
        c = config
        raise ModelFileError(
            f"{path}: weights do not match the stored architecture: its description claims a "
            f"network of {claimed:,} parameters ({c.levels} levels, {c.filters} filters, "
            f"{c.blocks} blocks, z_dim {c.z_dim}) but the file holds {held:,}; the file is damaged "
            "or was edited.")
    for k, t in want.items():
        v = weights.get(k)
        if v is None or v.dtype == t.dtype:
            continue  # a missing weight: load_state_dict names it
        if v.is_floating_point() and t.is_floating_point():
            weights[k] = v.to(t.dtype)
        else:
            raise ModelFileError(f"{path}: weights do not match the stored architecture ({k} is "
                                 f"{v.dtype}, not {t.dtype}); the file is damaged or was edited.")
    return ladder
