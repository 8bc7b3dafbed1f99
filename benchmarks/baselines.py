"""Classical baselines: scikit-image NL-means and TV, and BM3D when the optional package is there.

Parameters come from the noise level by fixed rules, never tuned on the ground truth. For
Poisson-Gaussian data the baselines run on the generalised Anscombe transform of the image (unit
noise variance) and the result is mapped back with the asymptotically unbiased inverse.
"""

from __future__ import annotations

import numpy as np


def gat(x, gain, read, offset):
    """Generalised Anscombe transform: Poisson-Gaussian -> approximately unit-variance Gaussian."""
    y = (x - offset) / gain
    s = read / gain
    return 2.0 * np.sqrt(np.maximum(y + 3.0 / 8.0 + s**2, 0.0))


def gat_inverse(z, gain, read, offset):
    s = read / gain
    y = (z / 2.0) ** 2 - 1.0 / 8.0 - s**2
    return y * gain + offset


def _stabilise(img, noise: dict):
    """Return (image with Gaussian noise, its std, inverse map)."""
    if noise["kind"] == "poisson-gaussian":
        g, r, o = noise["gain"], noise["read_noise"], noise["offset"]
        return gat(img, g, r, o), 1.0, lambda z: gat_inverse(z, g, r, o)
    return img.astype(np.float64), float(noise["sigma"]), lambda z: z


def nl_means(img, noise):
    from skimage.restoration import denoise_nl_means

    z, sigma, inv = _stabilise(img, noise)
    out = denoise_nl_means(z, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                           fast_mode=True)
    return inv(out).astype(np.float32)


def total_variation(img, noise):
    from skimage.restoration import denoise_tv_chambolle

    z, sigma, inv = _stabilise(img, noise)
    # weight proportional to the noise level (the objective is in image units)
    out = denoise_tv_chambolle(z, weight=1.0 * sigma)
    return inv(out).astype(np.float32)


def bm3d_available() -> bool:
    try:
        import bm3d  # noqa: F401
    except Exception:
        return False
    return True


def bm3d(img, noise):
    import bm3d as _bm3d

    z, sigma, inv = _stabilise(img, noise)
    return inv(_bm3d.bm3d(z, sigma_psd=sigma)).astype(np.float32)
