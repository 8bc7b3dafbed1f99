"""Synthetic fluorescence images with known ground truth, generated offline and reproducibly.

Nothing is downloaded: images are procedurally generated fluorescence-like scenes (cells, vesicles
and filaments), corrupted with Poisson shot noise, Gaussian read noise and a camera offset. They
feed the napari sample data (:mod:`napari_hdn.sample_data`), the demo, the benchmarks and the tests.
(Called ``samples`` before, a word this package keeps for posterior samples.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass
class SampleImage:
    """A noisy image with its ground truth and the noise parameters used to make it."""

    noisy: np.ndarray
    clean: np.ndarray
    gain: float
    read_noise: float
    offset: float
    name: str


def fluorescence_ground_truth(shape=(256, 256), seed: int = 0, peak: float = 60.0) -> np.ndarray:
    """A clean fluorescence-like image in photon units (background ~2, brightest ~``peak``)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    img = np.zeros(shape, np.float64)
    # cells: large soft ellipses with textured interior
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(max(3, h * w // 9000)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(10, 28, 2)
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(ang) + dx * np.sin(ang)) / ry
        v = (-dy * np.sin(ang) + dx * np.cos(ang)) / rx
        r2 = u**2 + v**2
        img += rng.uniform(0.2, 0.5) * (r2 < 1) * (1 - 0.5 * r2)
    # vesicles: small bright spots
    spots = np.zeros(shape)
    n = h * w // 400
    spots[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.5, 1.0, n)
    img += ndi.gaussian_filter(spots, 1.5) * 18
    # filaments: smooth random walks
    fil = np.zeros(shape)
    for _ in range(max(4, h * w // 6000)):
        p = rng.uniform(0, [h, w])
        ang = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.uniform(0.3, 1.0) * (h + w))):
            ang += rng.normal(0, 0.12)
            p = p + [np.sin(ang), np.cos(ang)]
            y, x = int(p[0]), int(p[1])
            if 0 <= y < h and 0 <= x < w:
                fil[y, x] = 1.0
    img += ndi.gaussian_filter(fil, 0.8) * 1.6
    img = ndi.gaussian_filter(img, 0.7)
    img = img / img.max()
    return (2.0 + (peak - 2.0) * img).astype(np.float32)


def add_camera_noise(clean, gain=1.0, read_noise=2.0, offset=100.0, seed=0) -> np.ndarray:
    """Poisson shot noise (``gain`` ADU per photon), Gaussian read noise and an offset, in ADU."""
    rng = np.random.default_rng(seed)
    shot = rng.poisson(np.clip(clean, 0, None)).astype(np.float64) * gain
    return (shot + offset + rng.normal(0, read_noise, clean.shape)).astype(np.float32)


def noisy_fluorescence(shape=(256, 256), seed: int = 0, peak: float = 60.0) -> SampleImage:
    """A noisy fluorescence-like image with its ground truth (both in ADU)."""
    gain, read, offset = 1.0, 2.0, 100.0
    clean_photons = fluorescence_ground_truth(shape, seed, peak)
    noisy = add_camera_noise(clean_photons, gain, read, offset, seed + 1)
    clean = (clean_photons * gain + offset).astype(np.float32)
    return SampleImage(noisy, clean, gain, read, offset, "noisy fluorescence")


def calibration_stack(n_frames: int = 50, shape=(128, 128), seed: int = 7) -> np.ndarray:
    """Many noisy frames of one static sample (same camera as :func:`noisy_fluorescence`)."""
    clean = fluorescence_ground_truth(shape, seed, peak=80.0)
    return np.stack([add_camera_noise(clean, 1.0, 2.0, 100.0, seed + 1 + k) for k in range(n_frames)])


def striped_fluorescence(shape=(256, 256), seed: int = 3, strength: float = 3.0,
                         length: float = 10.0) -> SampleImage:
    """Fluorescence with horizontal line artefacts: row-wise correlated noise.

    White noise smoothed along x over ~``length`` pixels is added on top of the camera noise; such
    structured noise is not pixel-wise and is what switching off low latent levels removes.
    """
    s = noisy_fluorescence(shape, seed)
    rng = np.random.default_rng(seed + 100)
    white = rng.normal(0, 1, shape)
    corr = ndi.gaussian_filter1d(white, length / 2.0, axis=1)
    corr *= strength / corr.std()
    return SampleImage((s.noisy + corr).astype(np.float32), s.clean, s.gain, s.read_noise,
                       s.offset, "striped fluorescence")
