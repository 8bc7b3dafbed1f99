"""Benchmark data with known ground truth, generated offline and reproducibly from a seed.

- ``fluo20`` / ``fluo100``: fluorescence-like images (scikit-image's bundled ``cell``,
  ``hubble_deep_field`` and immunohistochemistry DAB channel, plus procedurally generated cells,
  vesicles and filaments) scaled to peak ~20 or ~100 photons, with Poisson shot noise, Gaussian read
  noise (std 3 ADU, gain 1) and an offset of 100 ADU.
- ``natural25``: grayscale natural images bundled with scikit-image, additive Gaussian noise of
  sigma 25 on a 0-255 scale (the BSD68 protocol of the paper).
- ``stripes``: ``fluo100`` images plus row-correlated noise (white noise smoothed along x over ~10
  pixels), the line artefact the paper removes by switching off low latent levels.

Ground truth is used only for scoring. Every dataset also yields a calibration stack (many noisy
frames of a static sample taken with the same camera) for fitting a noise model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from napari_hdn.synthetic import fluorescence_ground_truth

GAIN, READ_NOISE, OFFSET = 1.0, 3.0, 100.0


@dataclass
class Dataset:
    name: str
    noisy: list[np.ndarray]
    clean: list[np.ndarray]
    calibration: np.ndarray  # (frames, Y, X) noisy frames of a static sample
    noise: dict  # the true noise parameters
    description: str
    extra: dict = field(default_factory=dict)


def _crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    y, x = (h - size) // 2, (w - size) // 2
    return img[y : y + size, x : x + size]


def _unit(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float64)
    lo, hi = np.percentile(img, [0.5, 99.9])
    return np.clip((img - lo) / (hi - lo), 0, 1)


def fluo_sources(size: int, n: int, seed: int) -> list[np.ndarray]:
    """Clean fluorescence-like images in 0..1 (bundled scikit-image images, then generated ones)."""
    from skimage import color, data

    bundled = [
        data.cell().astype(float),
        color.rgb2gray(data.hubble_deep_field()),
        color.rgb2hed(data.immunohistochemistry())[..., 2],
    ]
    out = []
    for k in range(n):
        if k < len(bundled) and min(bundled[k].shape) >= size:
            out.append(_unit(_crop(bundled[k], size)))
        else:
            g = fluorescence_ground_truth((size, size), seed=seed + k, peak=1.0)
            out.append(_unit(g))
    return out


def _camera(photons: np.ndarray, rng) -> np.ndarray:
    shot = rng.poisson(np.clip(photons, 0, None)).astype(np.float64) * GAIN
    return (shot + OFFSET + rng.normal(0, READ_NOISE, photons.shape)).astype(np.float32)


def fluo(peak: float, size: int, n: int, seed: int, calib_frames: int = 100) -> Dataset:
    rng = np.random.default_rng(seed)
    bg = 0.05 * peak
    sources = fluo_sources(size, n, seed)
    clean = [(bg + (peak - bg) * s) * GAIN + OFFSET for s in sources]
    noisy = [_camera((c - OFFSET) / GAIN, rng) for c in clean]
    # calibration: a different static sample spanning the same intensity range
    cal = fluorescence_ground_truth((min(size, 128), min(size, 128)), seed=seed + 999, peak=1.0)
    cal = bg + (peak - bg) * _unit(cal)
    stack = np.stack([_camera(cal, rng) for _ in range(calib_frames)])
    return Dataset(
        f"fluo{int(peak)}", noisy, [c.astype(np.float32) for c in clean], stack,
        {"kind": "poisson-gaussian", "gain": GAIN, "read_noise": READ_NOISE, "offset": OFFSET},
        f"fluorescence-like, peak ~{peak:g} photons, Poisson + read noise {READ_NOISE} ADU",
    )


def natural25(size: int, n: int, seed: int, calib_frames: int = 100) -> Dataset:
    from skimage import color, data

    rng = np.random.default_rng(seed)
    names = ["camera", "astronaut", "coins", "moon", "coffee", "chelsea", "rocket", "brick"]
    clean = []
    for name in names[:n]:
        img = getattr(data, name)()
        if img.ndim == 3:
            img = color.rgb2gray(img) * 255.0
        clean.append(_crop(img.astype(np.float32), size))
    noisy = [(c + rng.normal(0, 25, c.shape)).astype(np.float32) for c in clean]
    flat = np.linspace(0, 255, 128 * 128, dtype=np.float32).reshape(128, 128)
    stack = np.stack([flat + rng.normal(0, 25, flat.shape).astype(np.float32)
                      for _ in range(calib_frames)])
    return Dataset("natural25", noisy, clean, stack, {"kind": "gaussian", "sigma": 25.0},
                   "scikit-image natural images, additive Gaussian noise sigma 25 (0-255)")


def stripes(size: int, n: int, seed: int, strength: float = 4.0, length: float = 10.0) -> Dataset:
    base = fluo(100.0, size, n, seed)
    rng = np.random.default_rng(seed + 7)
    noisy = []
    for x in base.noisy:
        corr = ndi.gaussian_filter1d(rng.normal(0, 1, x.shape), length / 2.0, axis=1)
        noisy.append((x + corr * (strength / corr.std())).astype(np.float32))
    return Dataset("stripes", noisy, base.clean, base.calibration, base.noise,
                   f"fluo100 plus row-correlated noise (std {strength} ADU, ~{length:g} px along x)",
                   {"stripe_std": strength, "stripe_length": length})


def _stripe_field(shape, rng, axis: int, length: float) -> np.ndarray:
    """Unit-std white noise smoothed over ~``length`` pixels along ``axis``: stripes along it."""
    corr = ndi.gaussian_filter1d(rng.normal(0, 1, shape), length / 2.0, axis=axis)
    return corr / corr.std()


def _scan_lines(shape, rng, amplitude: float, density: float = 0.08) -> np.ndarray:
    """Line artefacts of a scanning microscope: horizontal segments 1-2 rows thick and 16-96 px
    long, each offset by a random amount (std ``amplitude`` ADU), covering ~``density`` of the
    pixels (a line scan that jumped, a laser flicker for part of a line)."""
    h, w = shape
    out = np.zeros(shape)
    covered = 0
    while covered < density * h * w:
        y, x = rng.integers(0, h), rng.integers(0, w)
        length, thick = int(rng.integers(16, 97)), int(rng.integers(1, 3))
        out[y : y + thick, x : x + length] += rng.normal(0, amplitude)
        covered += thick * min(length, w - x)
    return out


#: structured-noise sets (issue 9): name -> (what, stripe direction: the axis the artefact runs along)
STRUCTURED = {
    "stripes-x": ("row-correlated noise (std {s:g} ADU, ~10 px along x)", 1),
    "stripes-y": ("column-correlated noise (std {s:g} ADU, ~10 px along y)", 0),
    "lines": ("scan-line artefacts (segments 16-96 px long, 1-2 rows, offsets of std {s2:g} ADU)", 1),
}


def structured(kind: str, size: int, n: int, seed: int, strength: float = 8.0) -> Dataset:
    """``fluo100`` images plus structured noise the pixel noise model cannot explain (see
    :data:`STRUCTURED`); ``extra["axis"]`` is the direction the artefact runs along (for the
    stripe score)."""
    what, axis = STRUCTURED[kind]
    base = fluo(100.0, size, n, seed)
    rng = np.random.default_rng(seed + 11)
    noisy = []
    for x in base.noisy:
        if kind == "lines":
            art = _scan_lines(x.shape, rng, 2.0 * strength)
        else:
            art = strength * _stripe_field(x.shape, rng, axis, 10.0)
        noisy.append((x + art).astype(np.float32))
    return Dataset(kind, noisy, base.clean, base.calibration, base.noise,
                   "fluo100 plus " + what.format(s=strength, s2=2 * strength),
                   {"axis": axis, "strength": strength})


#: the names of :func:`make_datasets`' sets, in its order
NAMES = ("fluo20", "fluo100", "natural25", "stripes")


def make_datasets(size: int, n: int, seed: int) -> list[Dataset]:
    return [fluo(20.0, size, n, seed), fluo(100.0, size, n, seed + 1),
            natural25(size, n, seed + 2), stripes(size, n, seed + 3)]
