"""BioImage Model Zoo packages of HDN models: export (validated by bioimageio.core) and import.

A package is a zip with a bioimageio.spec 0.5 ``rdf.yaml``; its ``pytorch_state_dict`` weights
are the tensors of the ``.hdn`` file (``ladder.*`` and ``noise.*``, a plain dict of tensors that
``torch.load(..., weights_only=True)`` reads without running code), and its architecture is
:class:`HDNBioimageModel` from this package, whose ``kwargs`` carry the model description of the
``.hdn`` file (architecture, noise model, normalisation). The model's input is the raw noisy image
(batch, channel 1, y, x); its outputs are the MMSE and the per-pixel posterior variance, from a
fixed number of antithetic samples and a fixed seed, in the input's units: the normalisation is
part of the network (the noise model works on raw intensities), so the package declares no
normalising preprocessing. The noise model also travels as a ``.hdnoise`` attachment, for
fine-tuning elsewhere.

Import (:func:`load_bmz`) rebuilds exactly the model that was exported: predicting from the zip
and from the ``.hdn`` with the same seed gives the same MMSE. A package that napari-hdn did not
export is refused with the reason.

bioimageio.spec and bioimageio.core are optional (``pip install "napari-hdn[bmz]"``); import
needs neither (the zip is read with the standard library and the weights with torch).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import HDNError, HDNWarning, InputError, ModelFileError
from .network.loading import (
    ARCH_CALLABLE,
    ARCH_MODULE,
    CONFIG_KEY,
    MissingBMZ,
)

#: samples per MMSE in an exported package (a fixed count makes its test output reproducible;
#: antithetic pairs: 32 samples give an MMSE well within the "auto" rule's tolerance)
DEFAULT_SAMPLES = 32
#: side of the test tensor cut from the image (smaller images: the whole image)
TEST_SIDE = 128

HDN_CITATION = ("Prakash, M., Delbracio, M., Milanfar, P. & Jug, F. Interpretable Unsupervised "
                "Diversity Denoising and Artefact Removal. ICLR 2022.")
HDN_DOI = "10.48550/arXiv.2104.01374"


def _need_spec():
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise MissingBMZ("exporting to the BioImage Model Zoo needs bioimageio.spec and "
                         "bioimageio.core: pip install \"napari-hdn[bmz]\"") from None


# -- the architecture a BMZ consumer builds ----------------------------------------------------
class HDNBioimageModel(torch.nn.Module):
    """An HDN as a BioImage Model Zoo network: raw noisy (B, 1, Y, X) in, MMSE and variance out.

    ``model_meta``: the model description of a ``.hdn`` file (``config``, ``noise_model``,
    ``normalisation``). The weights arrive through :meth:`load_state_dict` (the tensors of the
    ``.hdn`` file), which builds the model exactly as :func:`~napari_hdn.load_model` does.
    """

    def __init__(self, model_meta: dict, n_samples: int = DEFAULT_SAMPLES, seed: int = 0,
                 sampling: str = "antithetic") -> None:
        super().__init__()
        if not isinstance(model_meta, dict) or "config" not in model_meta:
            raise ModelFileError("the package's architecture kwargs hold no napari-hdn model "
                                 "description (model_meta)")
        self.model_meta = dict(model_meta)
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        self.sampling = sampling
        self.hdn = None
        self.ladder = None  # a submodule once the weights are loaded (moves with .to())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        from torch.nn.modules.module import _IncompatibleKeys

        from .network.model import model_from_parts

        tensors = {str(k): v for k, v in dict(state_dict).items()}
        self.hdn = model_from_parts(self.model_meta, tensors, "the BioImage Model Zoo package")
        self.ladder = self.hdn.ladder
        return _IncompatibleKeys([], [])

    def _apply(self, fn, *args, **kwargs):  # .to(device), .float(), ...: the noise model too
        super()._apply(fn, *args, **kwargs)
        if self.hdn is not None:
            self.hdn.noise_model._apply(fn, *args, **kwargs)
        return self

    def forward(self, x: torch.Tensor):
        from .prediction.run import predict

        if self.hdn is None:
            raise RuntimeError("HDNBioimageModel: load the weights (load_state_dict) first")
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (batch, 1, y, x) tensor, got shape {tuple(x.shape)}")
        device = x.device
        frames = x[:, 0].detach().float().cpu().numpy()
        res = predict(self.hdn, frames, n_samples=self.n_samples, axes="SYX", seed=self.seed,
                      sampling=self.sampling, device=str(self.hdn.device))
        mmse = torch.from_numpy(np.ascontiguousarray(res.mmse, np.float32))[:, None]
        var = torch.from_numpy(np.ascontiguousarray(res.variance, np.float32))[:, None]
        return mmse.to(device), var.to(device)


# -- export ---------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What :func:`export_bmz` wrote and how its test went."""

    path: Path
    status: str
    seconds: float
    size_bytes: int
    hdn_bytes: int
    test_shape: tuple
    n_samples: int
    seed: int
    details: list = field(default_factory=list)

    def lines(self) -> list[str]:
        mb = self.size_bytes / 1e6
        return [f"wrote {self.path} ({mb:.2f} MB; the .hdn weights are {self.hdn_bytes / 1e6:.2f} "
                f"MB) in {self.seconds:.1f} s",
                f"bioimageio.core model test: {self.status} (test tensor {self.test_shape}, "
                f"{self.n_samples} samples, seed {self.seed})"]


def _test_crop(image, axes: str | None, side: int) -> np.ndarray:
    """A (1, 1, h, w) float32 crop of the first frame of ``image``, at most ``side`` square,
    from its centre."""
    from .data.arrays import check_axes
    from .data.frames import frames_of

    arr = image
    ax = check_axes(axes, np.shape(arr))
    if "C" in ax:
        raise InputError("the test image has a channel axis: export works on one-channel models; "
                         "give one channel of the training data")
    frame = np.asarray(frames_of(arr, ax)[0].read(), dtype=np.float32)
    if frame.ndim != 2:
        raise InputError(f"the test image's frames are not 2D (shape {frame.shape})")
    if not np.isfinite(frame).all():
        raise InputError("the test image holds NaN or infinite values: give finite data")
    h, w = (min(side, n) for n in frame.shape)
    y0, x0 = (frame.shape[0] - h) // 2, (frame.shape[1] - w) // 2
    return np.ascontiguousarray(frame[y0:y0 + h, x0:x0 + w])[None, None]


def _cover(x: np.ndarray, mmse: np.ndarray, var: np.ndarray, path: Path) -> None:
    """input | MMSE | variance, side by side, as a PNG (the zoo shows covers at 2:1)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5]))
    fig, axs = plt.subplots(1, 3, figsize=(9, 3.4), dpi=100)
    for a, img, title, kw in ((axs[0], x, "noisy input", {"vmin": lo, "vmax": hi}),
                              (axs[1], mmse, "HDN MMSE", {"vmin": lo, "vmax": hi}),
                              (axs[2], var, "posterior variance", {"cmap": "magma"})):
        a.imshow(img, cmap=kw.pop("cmap", "gray"), **kw)
        a.set_title(title)
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _readme(model, name: str, n_samples: int, seed: int, shape: tuple) -> str:
    info = model.info or {}
    cfg = model.config
    start = info.get("start") or {}
    prior = start.get("prior") or {}
    nm = model.noise_model
    nm_info = getattr(nm, "info", None) or {}
    verdict = nm_info.get("verdict")
    trained = [f"- steps: {info.get('steps', 'unknown')}"]
    if info.get("training_seconds"):
        trained.append(f"- training time: {float(info['training_seconds']):.0f} s")
    if start.get("init") == "prior":
        trained.append(f"- started from the bundled prior `{start.get('file')}` "
                       f"({prior.get('preset', 'preset unknown')})")
    if info.get("best_val_loss") is not None:
        trained.append(f"- best validation loss: {float(info['best_val_loss']):.4f}")
    noise = f"- noise model: {nm.kind}" + (f", fit judged **{verdict}**" if verdict else "")
    if nm_info.get("source"):
        noise += f" (fitted from {nm_info['source']})"
    image = info.get("image") or {}
    scale = image.get("scale") or {}
    px = (f"- pixel size: {scale.get('Y')} x {scale.get('X')} "
          f"{(image.get('units') or {}).get('X', '')}" if scale.get("X") else
          "- pixel size: not recorded")
    return "\n".join([
        f"# {name}",
        "",
        "A **Hierarchical DivNoising (HDN)** model, exported by "
        "[napari-hdn](https://github.com/napari-hdn/napari-hdn). HDN is a hierarchical "
        "variational autoencoder trained on noisy images alone (no clean targets): it learns a "
        "distribution of clean images that, passed through a pixel noise model, explains the noisy "
        "data. Its prediction is a set of diverse posterior samples; their mean (the MMSE "
        "estimate) is the denoised image and their variance shows where the restoration is "
        "uncertain.",
        "",
        "## Inputs and outputs",
        "",
        "- input `noisy`: the raw noisy image, (batch, 1, y, x), in the units of the training data "
        f"(the network normalises with mean {model.normalisation.mean:.6g} and std "
        f"{model.normalisation.std:.6g} itself; give it unnormalised data)",
        f"- output `mmse`: the mean of {n_samples} posterior samples (antithetic pairs, seed "
        f"{seed}), in the input's units",
        "- output `variance`: the per-pixel variance of those samples",
        f"- test tensor: a {shape[-2]}x{shape[-1]} crop of the training data",
        "",
        "## Training",
        "",
        f"- architecture: {cfg.levels} latent levels, {cfg.z_dim} latent channels, "
        f"{cfg.filters} filters, {cfg.blocks} blocks per level "
        f"({sum(p.numel() for p in model.ladder.parameters()):,} parameters)",
        *trained,
        noise,
        px,
        "",
        "The noise model is attached (`noise_model.hdnoise`, safetensors + JSON) so that the "
        "model can be fine-tuned: `napari-hdn train NEW_DATA --init model.zip --noise-model "
        "noise_model.hdnoise`.",
        "",
        "## Use",
        "",
        "With napari-hdn: `napari-hdn predict model.zip noisy.tif --out-dir restored` or the "
        "*Predict and explore* widget (the levels of the top-down path can be switched off to "
        "remove structured artefacts). Any bioimage.io consumer that runs `pytorch_state_dict` "
        "weights with napari-hdn installed gets the MMSE and the variance.",
        "",
        "## Cite",
        "",
        f"{HDN_CITATION} https://doi.org/{HDN_DOI}",
        "",
    ])


def _environment(path: Path) -> None:
    from .. import __version__

    path.write_text("\n".join([
        "name: napari-hdn",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        "  - python>=3.10",
        "  - pip",
        "  - pip:",
        f"    - napari-hdn=={__version__}",
        "",
    ]))


def export_bmz(model, out, image, *, axes: str | None = None, n_samples: int = DEFAULT_SAMPLES,
               seed: int = 0, name: str | None = None, authors: list[str] | None = None,
               license: str = "CC-BY-4.0", test_side: int = TEST_SIDE, validate: bool = True,
               overwrite: bool = False, source_path=None) -> ExportReport:
    """Write ``model`` as a BioImage Model Zoo package (a zip) at ``out`` and test it.

    Parameters
    ----------
    model : HDNModel
        A one-channel model (or the path of a ``.hdn`` file).
    out : path
        The ``.zip`` to write; written under a temporary name and renamed into place only after
        ``bioimageio.core``'s model test passed (``validate``).
    image : ndarray
        Noisy data like the training data: the test input is a crop of its first frame.
    n_samples, seed
        Samples per MMSE and their seed in the package (fixed: the test output is reproducible).
    name, authors, license
        The package's name (default: from the file name), authors (default: "napari-hdn user")
        and licence (an SPDX id, default CC-BY-4.0).

    Raises
    ------
    MissingBMZ
        Without bioimageio.spec / bioimageio.core.
    OutputError, InputError, ModelFileError
        For an output that exists (without ``overwrite``) or is an input, an image that is not one
        channel or not finite, a multi-channel model.
    HDNError
        When the package fails bioimageio.core's test (nothing is left at ``out``).
    """
    from .files.safeio import check_output
    from .network.loading import load_model
    from .network.model import HDNModel
    from .options import check_option

    _need_spec()
    if isinstance(model, (str, os.PathLike)):
        source_path = source_path or model
        model = load_model(model)
    if not isinstance(model, HDNModel):
        raise InputError("BioImage Model Zoo export takes a one-channel HDN; this model has "
                         f"{len(getattr(model, 'models', []))} channels: export each channel's model "
                         "(train one channel at a time) or share the .hdn file")
    check_option("n_samples", n_samples)
    check_option("seed", seed)
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise InputError(f"the package must be a .zip file, not {out.name}: give e.g. "
                         f"{out.with_suffix('.zip').name}")
    check_output(out, inputs=[source_path] if source_path else [], overwrite=overwrite,
                 what="package", overwrite_hint="add --overwrite")
    t0 = time.perf_counter()
    x = _test_crop(image, axes, test_side)
    if not name:
        stem = Path(source_path).stem if source_path else ""
        name = stem if len(stem) >= 5 else f"HDN model {stem}".strip()
    with tempfile.TemporaryDirectory(prefix="napari-hdn-bmz-") as tmp:
        tmp = Path(tmp)
        descr, arrays = _describe(model, x, tmp, name=name, authors=authors, license=license,
                                  n_samples=n_samples, seed=seed)
        staged = out.with_name(f".{out.name}.partial.zip")
        from bioimageio.spec import save_bioimageio_package

        try:
            save_bioimageio_package(descr, output_path=staged)
            details: list = []
            status = "not run"
            if validate:
                with warnings.catch_warnings():  # what the test output's run said, once is enough
                    warnings.simplefilter("ignore", HDNWarning)
                    status, details = _validate(staged)
                if status != "passed":
                    raise HDNError(f"the exported package failed bioimageio.core's model test "
                                   f"({'; '.join(details[:3]) or status}); nothing was written "
                                   f"to {out}")
            os.replace(staged, out)
        finally:
            if staged.exists():
                staged.unlink()
        hdn_bytes = sum(v.numel() * v.element_size() for v in model.file_contents()[0].values())
    return ExportReport(path=out, status=status, seconds=time.perf_counter() - t0,
                        size_bytes=out.stat().st_size, hdn_bytes=hdn_bytes,
                        test_shape=tuple(arrays["noisy"].shape), n_samples=int(n_samples),
                        seed=int(seed), details=details)


def _describe(model, x: np.ndarray, tmp: Path, *, name, authors, license, n_samples, seed):
    """The bioimageio.spec 0.5 description of ``model`` and its files, written into ``tmp``."""
    from bioimageio.spec.model import v0_5 as spec

    tensors, meta = model.file_contents()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    torch.save(state, tmp / "weights.pt")
    model_meta = {k: meta[k] for k in ("format", "format_version", "config", "noise_model",
                                       "normalisation")}
    model_meta = json.loads(json.dumps(model_meta))  # plain YAML-able values
    net = HDNBioimageModel(model_meta, n_samples=n_samples, seed=seed)
    net.load_state_dict(state)
    with torch.no_grad():
        mmse, var = net(torch.from_numpy(x))
    arrays = {"noisy": x, "mmse": mmse.numpy(), "variance": var.numpy()}
    for k, a in arrays.items():
        np.save(tmp / f"test_{k}.npy", a)
    _cover(x[0, 0], arrays["mmse"][0, 0], arrays["variance"][0, 0], tmp / "cover.png")
    (tmp / "README.md").write_text(_readme(model, name, n_samples, seed, x.shape))
    _environment(tmp / "environment.yaml")
    model.noise_model.save(tmp / "noise_model.hdnoise")

    info = model.info or {}
    image = info.get("image") or {}
    scale, units = image.get("scale") or {}, image.get("units") or {}
    unit = _space_unit(units.get("X"))
    if unit is not None and not all(_exact_scale(scale.get(a)) for a in "YX"):
        # bioimageio.spec checks an output's size as size * scale / scale in floating point
        # (0.2 gives 48.00000000000001 for 48): such a pixel size is in the config and README only
        unit = None
    step = 2 ** model.config.levels

    def space(axis: str, out: bool):
        kw = {"id": spec.AxisId(axis.lower())}
        s = scale.get(axis.upper())
        if unit is not None and s:
            kw.update(unit=unit, scale=float(s))
        if out:
            return spec.SpaceOutputAxis(size=spec.SizeReference(
                tensor_id=spec.TensorId("noisy"), axis_id=spec.AxisId(axis.lower())), **kw)
        return spec.SpaceInputAxis(size=spec.ParameterizedSize(min=step, step=step), **kw)

    def axes(out: bool):
        return [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("c0")]),
                space("y", out), space("x", out)]

    inp = spec.InputTensorDescr(
        id=spec.TensorId("noisy"), axes=axes(False),
        description="raw noisy image in the units of the training data (not normalised)",
        test_tensor=spec.FileDescr(source=tmp / "test_noisy.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))])
    outs = [spec.OutputTensorDescr(
        id=spec.TensorId(k), axes=axes(True), description=d,
        test_tensor=spec.FileDescr(source=tmp / f"test_{k}.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32"))
        for k, d in (("mmse", f"MMSE estimate: mean of {n_samples} posterior samples"),
                     ("variance", "per-pixel variance of the posterior samples"))]
    weights = spec.WeightsDescr(pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
        source=tmp / "weights.pt",
        architecture=spec.ArchitectureFromLibraryDescr(
            callable=spec.Identifier(ARCH_CALLABLE), import_from=ARCH_MODULE,
            kwargs={"model_meta": model_meta, "n_samples": int(n_samples), "seed": int(seed),
                    "sampling": "antithetic"}),
        pytorch_version=spec.Version(torch.__version__.split("+")[0]),
        dependencies=spec.FileDescr(source=tmp / "environment.yaml")))
    try:
        lic = spec.LicenseId(license)
        who = [spec.Author(name=a) for a in (authors or ["napari-hdn user"])]
    except Exception as exc:  # noqa: BLE001 - pydantic's error, as one line
        from .config import validation_message

        raise InputError(f"licence {license!r} or an author name is not valid for the zoo "
                         f"({validation_message(exc)}); give an SPDX licence id such as "
                         "CC-BY-4.0 or MIT") from None
    try:
        return _model_descr(spec, model, meta, info, tmp, name=name, who=who, lic=lic,
                            inp=inp, outs=outs, weights=weights, n_samples=n_samples,
                            seed=seed), arrays
    except ValueError as exc:  # pydantic's ValidationError: what the zoo refuses, as one line
        from .config import validation_message

        raise InputError(f"the zoo's description refuses this package: "
                         f"{validation_message(exc)} (e.g. --name needs 5 to 128 characters)"
                         ) from None


def _model_descr(spec, model, meta, info, tmp, *, name, who, lic, inp, outs, weights, n_samples,
                 seed):
    from .. import __version__

    params = sum(p.numel() for p in model.ladder.parameters())
    return spec.ModelDescr(
        name=name,
        description=("Hierarchical DivNoising (HDN): unsupervised denoising with diverse "
                     "posterior samples; outputs the MMSE and the per-pixel variance."),
        authors=who,
        cite=[spec.CiteEntry(text=HDN_CITATION, doi=spec.Doi(HDN_DOI))],
        license=lic,
        documentation=spec.FileDescr(source=tmp / "README.md"),
        covers=[spec.FileDescr(source=tmp / "cover.png")],
        attachments=[spec.FileDescr(source=tmp / "noise_model.hdnoise")],
        tags=["denoising", "unsupervised", "hierarchical-vae", "hdn", "napari-hdn", "2d",
              "pytorch", "fluorescence-light-microscopy"],
        inputs=[inp],
        outputs=outs,
        weights=weights,
        config=spec.Config(**{
            "bioimageio": spec.BioimageioConfig(
                architecture_type="hierarchical VAE (HDN)", model_parameter_count=int(params),
                task="denoising"),
            CONFIG_KEY: {"napari_hdn_version": __version__, "format": meta["format"],
                         "format_version": meta["format_version"], "n_samples": int(n_samples),
                         "seed": int(seed), "levels": int(model.config.levels),
                         "noise_model": model.noise_model.kind,
                         "pixel_size": {"scale": (info.get("image") or {}).get("scale") or {},
                                        "units": (info.get("image") or {}).get("units") or {}},
                         "normalisation": meta["normalisation"],
                         "training": {k: info[k] for k in ("steps", "best_val_loss",
                                                           "training_seconds", "axes")
                                      if k in info}},
        }),
    )


_UNITS = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "nm": "nanometer",
          "mm": "millimeter", "micrometer": "micrometer", "nanometer": "nanometer"}


def _exact_scale(s) -> bool:
    """Whether ``n * s / s == n`` in floating point for every image side up to 16384."""
    try:
        s = float(s)
    except (TypeError, ValueError):
        return False
    return s > 0 and all(n * s / s == n for n in range(1, 16385))


def _space_unit(unit):
    return _UNITS.get(str(unit).strip()) if unit else None


def _validate(path: Path) -> tuple[str, list[str]]:
    """Run bioimageio.core's model test on the package: (status, failed checks)."""
    from bioimageio.core import test_model

    summary = test_model(path, devices=["cpu"])
    failed = []
    for d in summary.details:
        if d.status != "passed":
            errs = "; ".join(str(e.msg).splitlines()[0] for e in (d.errors or [])[:2])
            failed.append(f"{d.name}: {errs}" if errs else str(d.name))
    return str(summary.status), failed
