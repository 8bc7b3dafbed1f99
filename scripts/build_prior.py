"""Build the prior that ships with napari-hdn, ``src/napari_hdn/priors/fast-cpu.hdn``.

What it builds: the "fast CPU" preset's network (engine/presets.py) trained on noisy images that
no benchmark of this project scores, saved as an ordinary model file whose ``info["prior"]``
records the recipe. A run with ``init="prior"`` takes only its weights (engine/priors.py).

From which images: the photographs bundled with scikit-image other than those the benchmarks
score (brick, cat, chelsea, clock, coffee, grass, gravel, moon, page, rocket, text, retina; with
``--photos more`` also scikit-learn's and matplotlib's sample photographs), in grey and scaled to
0..1 (0.5 / 99.9 percentiles), plus ``--phantoms`` generated fluorescence phantoms
(``napari_hdn.synthetic``, seeds 5000 and up; the benchmarks and the demo use seeds below 1100).
Each is shown at peaks of 20, 50, 100 and 300 photons over a 5 % background with Poisson noise and
Gaussian read noise (std 3, offset 100), and the network is trained with that Poisson-Gaussian
noise model.

How long: ``--seconds`` of training (default 300) plus a few seconds to make the images. The
shipped file is 300 s on one H200 GPU (6039 steps of batch 64); on a CPU the same budget gives
far fewer steps, so give it hours there.

The command, from the repository root (the shipped file's settings; then copy the file over
``src/napari_hdn/priors/fast-cpu.hdn`` and run the tests, which check the prior's architecture)::

    python scripts/build_prior.py --device cuda --seconds 300 --batch 64 --phantoms 48 --out fast-cpu.hdn
    python scripts/build_prior.py --save-clean clean.npz   # the photographs, for a machine without them
    python scripts/build_prior.py --clean-npz clean.npz --device cuda --out fast-cpu.hdn

How the recipe was chosen, and the priors tried and not shipped: docs/engine.md, "Starting from the
bundled prior".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

#: scikit-image photographs used for the prior (none of them is scored by the benchmarks)
NATURAL = ("brick", "cat", "chelsea", "clock", "coffee", "grass", "gravel", "moon", "page",
           "rocket", "text", "retina")
#: more photographs, bundled with packages other than scikit-image (``--photos more``): the left view
#: of scikit-image's stereo pair, scikit-learn's two sample images (CC BY 2.0, see
#: sklearn/datasets/images/README.txt) and matplotlib's portrait of Grace Hopper
EXTRA = ("motorcycle", "china", "flower", "grace_hopper")
#: with ``--photos more``, a photograph longer than this is first shrunk to it (patches are drawn in
#: proportion to area: retina alone, 1411 x 1411, was 45 % of the base set's photograph pixels)
MAX_SIDE = 640
#: images the benchmarks score: never used here
SCORED = ("camera", "astronaut", "coins", "cell", "hubble_deep_field", "immunohistochemistry")
PEAKS = (20.0, 50.0, 100.0, 300.0)
PHANTOM_SEED0 = 5000
GAIN, READ_NOISE, OFFSET, BACKGROUND = 1.0, 3.0, 100.0, 0.05


def unit_range(img: np.ndarray) -> np.ndarray:
    """``img`` scaled to 0..1 between its 0.5 and 99.9 percentiles (the scaling the benchmarks'
    own images get), clipped."""
    img = img.astype(np.float64)
    lo, hi = np.percentile(img, [0.5, 99.9])
    return np.clip((img - lo) / (hi - lo), 0, 1)


def _photograph(name: str) -> np.ndarray:
    from skimage import data, io

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    if name in ("china", "flower", "grace_hopper"):
        missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"the photographs of --photos more need {' and '.join(missing)}: "
                              "pip install scikit-learn matplotlib, or pass --clean-npz")
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        from matplotlib import cbook

        return io.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return getattr(data, name)()


def natural_images(names=NATURAL + EXTRA) -> dict[str, np.ndarray]:
    """The photographs in grey, each scaled to 0..1 (``EXTRA`` needs scikit-learn and matplotlib)."""
    from skimage import color

    assert not set(names) & set(SCORED)
    out = {}
    for name in names:
        im = _photograph(name)
        if im.ndim == 3:
            im = color.rgb2gray(im[..., :3])
        out[name] = unit_range(np.asarray(im, np.float64)).astype(np.float32)
    return out


def photo_names(photos: str) -> tuple[str, ...]:
    if photos not in ("base", "more"):
        raise ValueError(f"photos must be 'base' or 'more', not {photos!r}")
    return NATURAL if photos == "base" else tuple(n for n in NATURAL if n != "chelsea") + EXTRA


def clean_images(phantoms: int, clean_npz: str | None = None, photos: str = "base",
                 scales: tuple[float, ...] = (1.0,)) -> list[np.ndarray]:
    """The photographs, each at every scale of ``scales`` (1 = as below, 0.5 = half that size,
    anti-aliased), then ``phantoms`` phantoms. ``base``: ``NATURAL`` as bundled (cat and chelsea are
    the same photograph); ``more``: ``NATURAL`` without chelsea, and ``EXTRA``, none longer than
    ``MAX_SIDE``."""
    from skimage.transform import rescale

    from napari_hdn.synthetic import fluorescence_ground_truth

    names = photo_names(photos)
    if clean_npz:
        z = np.load(clean_npz)
        natural = [z[k] for k in names]
    else:
        natural = list(natural_images(names).values())
    if photos == "more":
        natural = [im if max(im.shape) <= MAX_SIDE else
                   rescale(im, MAX_SIDE / max(im.shape), anti_aliasing=True).astype(np.float32)
                   for im in natural]
    natural = [im if s == 1 else rescale(im, s, anti_aliasing=True).astype(np.float32)
               for s in scales for im in natural]
    return natural + [unit_range(fluorescence_ground_truth((256, 256), seed=PHANTOM_SEED0 + k, peak=1.0))
                      for k in range(phantoms)]


def noisy_frames(clean: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Every clean image at every photon level of ``PEAKS``, with camera noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for c in clean:
        for peak in PEAKS:
            photons = (BACKGROUND + (1 - BACKGROUND) * c) * peak
            frames.append((GAIN * rng.poisson(photons) + OFFSET + rng.normal(0, READ_NOISE, c.shape))
                          .astype(np.float32))
    return frames


PRETRAIN_DROPOUT = 0.1


def pretrain(device: str, seconds: float, batch: int, phantoms: int, out: str,
             clean_npz: str | None = None, seed: int = 0, photos: str = "base",
             scales: tuple[float, ...] = (1.0,), threads: int = 4, init: str = "scratch"):
    import torch

    from napari_hdn.engine import PoissonGaussianNoiseModel, Trainer
    from napari_hdn.engine.training.presets import get_preset

    torch.set_num_threads(threads)
    frames = noisy_frames(clean_images(phantoms, clean_npz, photos, scales), seed)
    preset = get_preset("fast CPU")
    tcfg = preset.training_config(val_fraction=0.0, device=device, seed=seed, max_steps=10**6,
                                  time_budget_s=seconds, batch_size=batch, init=init)
    # the shipped prior was pretrained with the preset's dropout, 0.1; recorded in its recipe
    trainer = Trainer(frames, PoissonGaussianNoiseModel(GAIN, READ_NOISE, OFFSET),
                      model_config=preset.model_config(dropout=PRETRAIN_DROPOUT),
                      training_config=tcfg)
    t = time.perf_counter()
    model = trainer.run()
    model.info["prior"] = recipe(trainer.step, seconds, batch, phantoms, device, seed, photos, scales)
    if init != "scratch":
        model.info["prior"] = continued(model.info["prior"], init)
    model.save(out)
    print(json.dumps({"steps": trainer.step, "seconds": round(time.perf_counter() - t, 1),
                      "frames": len(frames), "out": out}), flush=True)
    return model


def continued(this: dict, init: str) -> dict:
    """The recipe of a run that went on from the prior ``init``: that prior's recipe nested in it,
    and the steps of both together (each run warmed its rate up and averaged its weights anew)."""
    from napari_hdn.engine.network.loading import load_model

    before = load_model(init, device="cpu").info.get("prior", {})
    return {**this, "continued_from": before,
            "total_steps": this["steps"] + before.get("total_steps", before.get("steps", 0))}


def recipe(steps: int, seconds: float, batch: int, phantoms: int, device: str, seed: int,
           photos: str = "base", scales: tuple[float, ...] = (1.0,)) -> dict:
    return {
        "made_by": "scripts/build_prior.py",
        "images": {"photographs": list(photo_names(photos)),
                   "max_side": MAX_SIDE if photos == "more" else None,
                   "scales": list(scales), "phantoms": phantoms,
                   "phantom_seeds": [PHANTOM_SEED0, PHANTOM_SEED0 + phantoms - 1]},
        "never_used": list(SCORED),
        "noise": {"kind": "poisson-gaussian", "gain": GAIN, "read_noise": READ_NOISE,
                  "offset": OFFSET, "peaks_photons": list(PEAKS), "background": BACKGROUND},
        "preset": "fast CPU", "dropout": PRETRAIN_DROPOUT, "steps": steps, "seconds": seconds,
        "batch_size": batch,
        "device": device, "seed": seed,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, default=300.0, help="training time budget")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--phantoms", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", choices=("base", "more"), default="base",
                    help="'base': the 12 scikit-image photographs as bundled (the shipped prior's); "
                    "'more': without the duplicate chelsea, with EXTRA, none longer than MAX_SIDE")
    ap.add_argument("--scales", default="1", help="comma-separated scales of each photograph")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--init", default="scratch", help="'scratch', or a model file to go on from")
    ap.add_argument("--out", default="fast-cpu.hdn")
    ap.add_argument("--clean-npz", default=None, help="the photographs saved by --save-clean")
    ap.add_argument("--save-clean", default=None, help="write the photographs here and stop")
    a = ap.parse_args(argv)
    if a.save_clean:
        np.savez_compressed(a.save_clean, **natural_images())
        return
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pretrain(a.device, a.seconds, a.batch, a.phantoms, a.out, a.clean_npz, a.seed, a.photos,
             tuple(float(v) for v in a.scales.split(",")), a.threads, a.init)


if __name__ == "__main__":
    main()
