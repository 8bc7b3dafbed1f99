"""Shared test helpers (tiny configurations, synthetic images)."""

import numpy as np

TINY = dict(levels=2, z_dim=2, filters=8, blocks=1, dropout=0.0)


def smooth_image(shape=(64, 64), seed=0):
    """A smooth synthetic ground truth in 0..100."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.normal(size=shape), 4)
    img = (img - img.min()) / (img.max() - img.min())
    return (100 * img).astype(np.float32)
