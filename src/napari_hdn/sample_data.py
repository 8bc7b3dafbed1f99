"""npe2 sample data: offline, generated on the fly (File > Open Sample > Hierarchical DivNoising).

Each function returns napari layer data tuples. The images come from :mod:`napari_hdn.synthetic`
(procedural fluorescence-like scenes with camera noise), so nothing is downloaded. The camera
parameters used to make them are stored in each layer's metadata under ``"camera"``; the ground
truth is added as a hidden layer.
"""

from __future__ import annotations

import numpy as np

from . import synthetic


def _limits(img: np.ndarray) -> list[float]:
    lo, hi = np.percentile(img, [0.2, 99.8])
    return [float(lo), float(hi)]


def _camera(s: synthetic.SampleImage) -> dict:
    return {"gain": s.gain, "read_noise": s.read_noise, "offset": s.offset}


def _with_truth(s: synthetic.SampleImage, name: str) -> list[tuple]:
    lims = _limits(s.noisy)
    meta = {"camera": _camera(s), "source": "napari-hdn sample data (synthetic)"}
    return [
        (s.clean, {"name": f"{name} ground truth", "visible": False, "contrast_limits": lims,
                   "metadata": {**meta, "ground_truth": True}}, "image"),
        (s.noisy, {"name": name, "contrast_limits": lims, "metadata": meta}, "image"),
    ]


def noisy_fluorescence_sample() -> list[tuple]:
    """A 256x256 noisy fluorescence-like image (Poisson-Gaussian camera noise) and its ground truth."""
    return _with_truth(synthetic.noisy_fluorescence(), "noisy fluorescence")


def calibration_stack_sample() -> list[tuple]:
    """50 noisy frames (128x128) of a static sample, same camera: for fitting a noise model."""
    stack = synthetic.calibration_stack()
    meta = {"camera": {"gain": 1.0, "read_noise": 2.0, "offset": 100.0},
            "source": "napari-hdn sample data (synthetic)", "axes": "SYX"}
    return [(stack, {"name": "calibration stack", "contrast_limits": _limits(stack[0]),
                     "metadata": meta}, "image")]


def striped_fluorescence_sample() -> list[tuple]:
    """Fluorescence with horizontal stripes (row-wise correlated noise) and its ground truth.

    For the artefact-removal workflow: the stripes are structured noise that a pixel noise model
    cannot explain, and switching off the lowest latent levels removes them.
    """
    return _with_truth(synthetic.striped_fluorescence(), "striped fluorescence")
