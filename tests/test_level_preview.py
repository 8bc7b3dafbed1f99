"""The artefact preview's figures without Qt (engine/level_preview.py): preview windows, each
level's cost against the model's own setting, and what the cache keeps between level changes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_hdn.engine import InputError
from napari_hdn.engine.prediction.level_preview import (
    MIN_PREVIEW_SIDE,
    LevelCost,
    Preview,
    PreviewCache,
    Region,
    crop_key,
    crop_window,
    level_cost,
    preview_levels,
    view_window,
)
from napari_hdn.engine.prediction.levels import mean_log_likelihood

pytestmark = pytest.mark.usefixtures("one_thread")


def test_level_cost_is_the_fraction_of_energy_removed():
    ref = np.array([[0.0, 2.0], [4.0, 6.0]])  # mean 3: energy 9 + 1 + 1 + 9 = 20
    changed = ref - np.array([[1.0, 0.0], [0.0, 1.0]])  # removes 2
    assert level_cost(ref, changed, -1.5, -1.25) == LevelCost(0.1, 0.25)
    assert level_cost(np.ones((2, 2)), np.zeros((2, 2)), 0.0, 0.0).energy == 0.0  # flat: no energy


def test_crop_and_view_windows():
    assert crop_window(100, 120, 8, 37, 70, 60) == (32, 64, 60, 56)  # origin down to 8, cut at edge
    with pytest.raises(InputError, match="outside the image"):
        crop_window(100, 120, 8, 104, 0, 50)
    # no view known: centred on the image, at most the side (the origin aligned to 16)
    assert view_window(400, 400, 16, 128, None, None) == (144, 144, 112, 112)
    # at most 3/4 of what is visible, but never below the minimum side
    y0, x0, h, w = view_window(1000, 1000, 4, 256, (500.0, 300.0), (200, 40))
    assert h <= 150 and w == MIN_PREVIEW_SIDE and y0 % 4 == 0 and x0 % 4 == 0
    assert abs(y0 + h / 2 - 500) <= 0.5 and abs(x0 + w / 2 - 300) <= 0.5
    assert view_window(40, 50, 4, 256, (20.0, 25.0), (40, 50)) == (0, 0, 40, 50)  # small image


def test_a_preview_computes_each_level_cost_once(tiny_model):
    crop = np.random.default_rng(0).normal(50, 10, (32, 32)).astype(np.float32)
    region = Region((), 0, 0, 32, 32)
    key, cache = crop_key(tiny_model, region, crop), PreviewCache()
    assert crop_key(tiny_model, region, crop.copy()) == key  # keyed by content
    assert crop_key(tiny_model, region, crop + 1) != key

    def run(modes):
        out = preview_levels(tiny_model, crop, (0, 0), modes, 2, 7,
                             **cache.reuse(tiny_model, key, 2, 7))
        cache.keep(tiny_model, key, 2, 7, out)
        return out

    def ll(img):
        return mean_log_likelihood(tiny_model.noise_model, crop, img)

    on = run(["posterior", "posterior"])  # the model's own setting: the reference, no cost
    assert not on.cached and on.costs == {} and on.total is None
    np.testing.assert_array_equal(on.reference[0], on.mmse)
    one = run(["prior-mean", "posterior"])
    assert one.cached and one.net is on.net
    expected = level_cost(on.mmse, one.mmse, ll(on.mmse), ll(one.mmse))
    assert one.costs == {(1, "prior-mean"): expected} == {(1, "prior-mean"): one.total}
    assert 0 < expected.energy < 1
    both = run(["prior-mean", "prior-mean"])  # level 1's cost from the cache, level 2's computed
    assert both.costs[(1, "prior-mean")] is one.costs[(1, "prior-mean")]
    assert both.total == level_cost(on.mmse, both.mmse, ll(on.mmse), ll(both.mmse))
    assert cache.cost(key, 2, 7, 2, "prior-mean") == both.costs[(2, "prior-mean")]
    assert cache.cost(key, 4, 7, 2, "prior-mean") is None  # other sample counts: other figures


def test_the_cache_forgets_the_oldest_crop(tiny_model):
    cache = PreviewCache(max_crops=2)
    ref = (np.zeros((2, 2)), 0.0)
    for k in range(3):
        key = (id(tiny_model), k)
        cache.keep(tiny_model, key, 1, 0, Preview(np.zeros((2, 2)), f"sampler {k}", "net", False,
                                                  ref, {(1, "zero"): LevelCost(0.1, 0.0)}, None,
                                                  0.0, 0.0, 0.0))
    assert list(cache.samplers) == [(id(tiny_model), 1), (id(tiny_model), 2)]
    assert cache.cost((id(tiny_model), 0), 1, 0, 1, "zero") is None
    assert cache.cost((id(tiny_model), 2), 1, 0, 1, "zero") == LevelCost(0.1, 0.0)
    assert cache.reuse(tiny_model, (id(tiny_model), 2), 1, 0)["net"] == "net"
    assert cache.reuse(object(), (id(tiny_model), 2), 1, 0)["net"] is None  # another model's copy
    cache.clear()
    assert cache.reuse(tiny_model, (id(tiny_model), 2), 1, 0)["sampler"] is None


def test_the_preview_engine_imports_no_qt():
    probe = ("import sys, json\nimport napari_hdn.engine.prediction.level_preview\n"
             "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in mods if m.split(".")[0] in ("qtpy", "PyQt5", "PyQt6", "napari")]
