import numpy as np
import pytest
import torch

from napari_hdn.engine import InputError, to_frames
from napari_hdn.engine.data.arrays import augment_batch, split_train_val


def test_axes_and_frames():
    a = np.zeros((3, 4, 20, 30), np.uint16)
    assert len(to_frames(a, "TZYX")) == 12
    assert len(to_frames(np.zeros((5, 20, 30)), "ZYX")) == 5
    assert len(to_frames([np.zeros((20, 30)), np.zeros((25, 31))])) == 2
    with pytest.raises(InputError, match="channel axis"):
        to_frames(np.zeros((3, 20, 30)), "CYX")
    with pytest.raises(InputError, match="3 letters but the image has 2"):
        to_frames(np.zeros((20, 30)), "TYX")
    with pytest.raises(InputError, match="end with 'YX'"):
        to_frames(np.zeros((20, 30, 3)), "YXT")
    with pytest.raises(InputError, match="RGB"):
        to_frames(np.zeros((64, 64, 3)))
    with pytest.raises(InputError, match="at most 5"):
        to_frames(np.zeros((2,) * 6))


def test_bad_values():
    with pytest.raises(InputError, match="NaN"):
        to_frames(np.array([[1.0, np.nan], [0, 0]]))
    with pytest.raises(InputError, match="dtype"):
        to_frames(np.array([["a", "b"]]))
    with pytest.raises(InputError, match="empty"):
        to_frames(np.zeros((0, 5)))


def test_split_holds_out_frames_or_a_band():
    frames = [np.zeros((64, 64), np.float32) for _ in range(10)]
    train, val, note = split_train_val(frames, 0.2, 32)
    assert (len(train), len(val)) == (8, 2) and "frames" in note
    train, val, _ = split_train_val([np.zeros((128, 80), np.float32)], 0.1, 32)
    assert train[0].shape == (96, 80) and val[0].shape == (32, 80)
    with pytest.raises(InputError, match="smaller than the patch size 64"):
        split_train_val([np.zeros((40, 80), np.float32)], 0.1, 64)


def test_augmentation_is_dihedral():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    variants = {tuple(o.flatten().tolist()) for o in out}
    assert len(variants) == 8  # all 8 rotations/flips appear in 64 draws
    assert all(sorted(v) == list(range(16)) for v in variants)
