"""Images in, frames out: axes handling, validation, normalisation, patches and augmentation."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HDNWarning, InputError
from ..options import RULES
from .frames import (
    MAX_ABS_VALUE,
    Frame,
    check_saturation,
    frame_statistics,
    frames_of,
    is_lazy,
    plain_array,
)

FRAME_AXES = "STZ"  # leading axes treated as independent 2D frames (Z slice-wise)
#: a guessed X axis this many times shorter than Y gets a warning (it is probably not X)
SHORT_LAST_AXIS = 4


def default_axes(ndim: int) -> str:
    """Axes assumed when none are given: YX, SYX for 3D, STYX... for more."""
    if ndim < 2:
        raise InputError(f"expected an image with at least 2 dimensions (YX), got {ndim}")
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "SYX"
    if ndim == 4:
        return "TZYX"
    if ndim == 5:
        return "STZYX"
    raise InputError(f"images with {ndim} dimensions are not supported (at most 5: STZYX)")


def check_axes(axes: str | None, shape: Sequence[int]) -> str:
    """Validate an axes string such as "YX", "TYX", "ZYX", "STYX" against an array shape."""
    ndim = len(shape)
    if axes is None:
        axes = default_axes(ndim)
        if ndim == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
            raise InputError(
                f"array of shape {tuple(shape)} looks like an RGB(A) image; this works on one "
                "channel: train and predict with axes='YXC' (an HDN per colour channel), select "
                "one channel, or pass axes='SYX' if the last axis really is X."
            )
        if ndim >= 3 and shape[-1] * SHORT_LAST_AXIS <= min(shape[:-1]):
            warnings.warn(
                f"the axes of the array of shape {tuple(shape)} were guessed as {axes}, so its last "
                f"axis ({shape[-1]}) is read as X although it is much shorter than the others: if "
                "it holds frames, time points or channels, give the axes (e.g. YXT is not "
                "supported: move that axis first) or transpose the data",
                HDNWarning, stacklevel=3,
            )
        return axes
    ax = str(axes).upper().replace(" ", "")
    if "C" in ax:
        raise InputError(
            f"axes {axes!r} contain a channel axis C; this works on one channel: select one "
            "channel first, or train (and predict) with these axes to get an HDN per channel."
        )
    if len(ax) != ndim:
        raise InputError(f"axes {axes!r} have {len(ax)} letters but the image has {ndim} dimensions")
    if not ax.endswith("YX"):
        raise InputError(f"axes {axes!r} must end with 'YX' (rows, columns)")
    lead = ax[:-2]
    if any(a not in FRAME_AXES for a in lead) or len(set(lead)) != len(lead):
        raise InputError(
            f"axes {axes!r}: leading axes must be distinct letters from 'S', 'T', 'Z' (e.g. 'TYX')"
        )
    return ax


#: shapes listed in the message about a list of images of different shapes
_SHOWN_SHAPES = 4


def image_array(image, name: str = "image"):
    """One array from an image argument, unconverted: what :func:`~.frames.plain_array` makes of
    a tensor, a masked array or a lazy array; a list or tuple of images stacked along a new first
    axis (frames), which needs them to have one shape.

    Raises
    ------
    InputError
        A path or None, a masked array with masked pixels, a tensor without values, an empty list,
        or a list of images of different shapes (one result cannot hold them: one call per image,
        or crop them to one shape; training takes such a list as it is, see :func:`to_frames`).
    """
    if not isinstance(image, (list, tuple)):
        arr = plain_array(image, name)
        return arr if is_lazy(arr) else np.asarray(arr)
    if not image:
        raise InputError(f"{name}: the list of images is empty")
    parts = [np.asarray(plain_array(im, f"{name}[{k}]")) for k, im in enumerate(image)]
    shapes = [p.shape for p in parts]
    if len(set(shapes)) > 1:
        listed = ", ".join(str(sh) for sh in shapes[:_SHOWN_SHAPES]) + \
            (", ..." if len(shapes) > _SHOWN_SHAPES else "")
        raise InputError(
            f"{name}: the {len(parts)} images of the list have different shapes ({listed}), and "
            "one result holds one shape: give them one call each, or crop them to one shape")
    return np.stack(parts)


def as_float_array(image, name: str = "image") -> np.ndarray:
    """Validate dtype and values; return float32 (an image argument as :func:`image_array`
    takes it: tensors, masked arrays without masked pixels, lists of images of one shape)."""
    arr = np.asarray(image_array(image, name))
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InputError(f"{name} has dtype {arr.dtype}; expected a numeric (integer or float) array")
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise InputError(
            f"{name} contains {n} NaN or infinite pixel(s); replace them (e.g. with the median) first"
        )
    big = float(np.abs(arr).max()) if arr.dtype.kind in "fiu" else 0.0
    if big > MAX_ABS_VALUE:
        raise InputError(
            f"{name} has values up to {big:.3g}, beyond what float32 arithmetic can square "
            f"(at most {MAX_ABS_VALUE:.0e}); rescale the data first (e.g. divide it by "
            f"{10.0 ** round(np.log10(big) - 4):.0e})"
        )
    return arr.astype(np.float32, copy=False)


def _frames_of_list(images, axes, name: str, frames_of_one) -> list:
    """The frames of every image of a list, in order (``frames_of_one(image, axes, name)``)."""
    frames = []
    for k, im in enumerate(images):
        frames += frames_of_one(im, axes, name=f"{name}[{k}]")
    if not frames:
        raise InputError(f"{name}: the list of images is empty")
    return frames


def to_frames(images, axes: str | None = None, name: str = "image") -> list[np.ndarray]:
    """Turn an array (YX, SYX, TYX, ZYX, ...) or a list of 2D arrays into a list of 2D float frames."""
    if isinstance(images, (list, tuple)):
        return _frames_of_list(images, axes, name, to_frames)
    arr = as_float_array(images, name)
    ax = check_axes(axes, arr.shape)
    return list(arr.reshape(-1, *arr.shape[-2:])) if len(ax) > 2 else [arr]


def training_frames(images, axes: str | None = None, name: str = "image") -> list[Frame]:
    """The 2D frames of training data as :class:`~.frames.Frame` s, read on demand: an array
    (numpy, memory-mapped, dask, zarr, :class:`~.frames.TiffPages`) or a list of them is never
    copied whole. Axes as :func:`to_frames`; the values are checked when they are read
    (:func:`~.frames.frame_statistics`). A torch tensor gives its values, a masked array with
    masked pixels is refused (:func:`~.frames.plain_array`); saturated data get a
    :class:`~.frames.SaturationWarning` (a few frames are sampled for it)."""
    frames = _training_frames(images, axes, name)
    check_saturation(frames, name if name.startswith("the ") else f"the {name}")
    return frames


def _training_frames(images, axes, name: str) -> list[Frame]:
    if isinstance(images, (list, tuple)):
        if images and all(isinstance(f, Frame) for f in images):
            return list(images)
        return _frames_of_list(images, axes, name, _training_frames)
    arr = plain_array(images, name)
    arr = arr if is_lazy(arr) else np.asarray(arr)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise InputError(f"{name} has dtype {arr.dtype}; expected a numeric (integer or float) array")
    if 0 in tuple(arr.shape):
        raise InputError(f"{name} is empty (shape {tuple(arr.shape)})")
    ax = check_axes(axes, tuple(arr.shape))
    return frames_of(arr, ax, name=name)


@dataclass
class Normalisation:
    """Scalar mean/std of the training data; the model works on (x - mean) / std."""

    mean: float
    std: float

    @classmethod
    def from_frames(cls, frames: Sequence) -> Normalisation:
        """Mean and std of every pixel of ``frames`` (arrays or :class:`~.frames.Frame` s, read
        one at a time), after checking their values."""
        mean, std = frame_statistics(frames, "the training images")
        if not std > 0:
            raise InputError(
                "the training images are constant (zero variance): there is nothing to denoise"
            )
        return cls(mean, std)

    def forward(self, x):
        return (x - self.mean) / self.std

    def inverse(self, x):
        return x * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply one of the 8 rotations/flips (dihedral group) to each patch of a (B,1,P,P) batch."""
    k = torch.randint(0, 8, (x.shape[0],), generator=gen)
    out = torch.empty_like(x)
    for code in range(8):
        idx = (k == code).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        y = torch.rot90(x[idx], code % 4, dims=(2, 3))
        if code >= 4:
            y = torch.flip(y, dims=(3,))
        out[idx] = y
    return out


class PatchSampler:
    """Draws random square patches from a list of 2D frames (each at least one patch in size).

    Frames that are numpy arrays are held as tensors; :class:`~.frames.Frame` s are read patch by
    patch (nothing of them is kept), through ``transform`` (e.g. the normalisation) when given.
    """

    def __init__(self, frames: Sequence, patch: int, gen: torch.Generator, transform=None):
        self.lazy = any(isinstance(f, Frame) for f in frames)
        self.transform = transform
        if self.lazy:
            self.frames = list(frames)
        else:
            self.frames = [torch.from_numpy(np.ascontiguousarray(
                transform(f) if transform is not None else f)) for f in frames]
        self.patch = patch
        self.gen = gen
        areas = np.array([(f.shape[0] - patch + 1) * (f.shape[1] - patch + 1) for f in frames], float)
        if (areas <= 0).any():
            raise InputError(f"every frame must be at least {patch}x{patch} pixels")
        self.weights = torch.tensor(areas / areas.sum())

    def sample(self, n: int) -> torch.Tensor:
        p = self.patch
        which = torch.multinomial(self.weights, n, replacement=True, generator=self.gen)
        out = torch.empty(n, 1, p, p)
        for j, fi in enumerate(which.tolist()):
            f = self.frames[fi]
            y = int(torch.randint(0, f.shape[0] - p + 1, (1,), generator=self.gen))
            x = int(torch.randint(0, f.shape[1] - p + 1, (1,), generator=self.gen))
            if self.lazy:
                a = f[y : y + p, x : x + p]
                out[j, 0] = torch.from_numpy(self.transform(a) if self.transform is not None else a)
            else:
                out[j, 0] = f[y : y + p, x : x + p]
        return out


def grid_patches(frames: Sequence, patch: int, limit: int, transform=None) -> torch.Tensor:
    """Non-overlapping patches on a regular grid (deterministic validation set), at most
    ``limit`` of them, evenly spread; only those are read (``transform``: e.g. the
    normalisation, applied to each)."""
    where = [(k, y, x) for k, f in enumerate(frames)
             for y in range(0, f.shape[0] - patch + 1, patch)
             for x in range(0, f.shape[1] - patch + 1, patch)]
    if not where:
        raise InputError(f"no {patch}x{patch} validation patch fits in the validation data")
    if len(where) > limit:
        keep = np.linspace(0, len(where) - 1, limit).round().astype(int)
        where = [where[k] for k in keep]
    out = []
    for k, y, x in where:
        a = np.asarray(frames[k][y : y + patch, x : x + patch], dtype=np.float32)
        out.append(transform(a) if transform is not None else a)
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32))


def split_train_val(
    frames: Sequence[np.ndarray], val_fraction: float, patch: int
) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Hold out data for validation without overlap between training and validation patches.

    Whole frames are held out when there are enough of them; otherwise a band of rows at the bottom
    of each frame (at least one patch tall). Returns (train, val, description).
    """
    small = [f.shape for f in frames if min(f.shape) < patch]
    if small:
        side = min(min(s) for s in small)
        least = int(RULES["patch_size"].minimum)
        fix = (f"choose a patch size of at most {side} (a multiple of 8 is best) or a larger image"
               if side >= least else f"train on images at least {least} pixels on each side")
        raise InputError(f"image of shape {small[0]} is smaller than the patch size {patch}: {fix}")
    if val_fraction <= 0:
        return list(frames), [], "no validation"
    n_val = int(round(len(frames) * val_fraction))
    if n_val >= 1 and len(frames) - n_val >= 1:
        return list(frames[: len(frames) - n_val]), list(frames[len(frames) - n_val :]), (
            f"{n_val} of {len(frames)} frames held out"
        )
    train, val = [], []
    for f in frames:
        band = max(patch, int(round(f.shape[0] * val_fraction)))
        if f.shape[0] - band < patch:
            raise InputError(
                f"image of shape {f.shape} is too small to hold out a validation band of {band} rows "
                f"and keep {patch}-pixel training patches: use a smaller patch size, more frames, "
                "or val_fraction=0"
            )
        train.append(f[: f.shape[0] - band])
        val.append(f[f.shape[0] - band :])
    return train, val, f"bottom {val_fraction:.0%} of rows of each frame held out"
