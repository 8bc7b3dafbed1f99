"""The tool that builds the bundled prior (scripts/build_prior.py): its images and its recipe."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "build_prior", Path(__file__).resolve().parents[1] / "scripts" / "build_prior.py")
build_prior = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(build_prior)


def test_a_new_prior_says_it_was_made_by_this_tool():
    r = build_prior.recipe(10, 1.0, 4, 2, "cpu", 0)
    assert r["made_by"] == "scripts/build_prior.py"
    assert not set(r["images"]["photographs"]) & set(r["never_used"])


def test_prior_images_more_photographs_drop_the_duplicate_cap_the_size_and_add_scales(tmp_path):
    """``--photos more``: chelsea (the same photograph as cat) is left out, the extra photographs come
    in, none is longer than MAX_SIDE, and every scale adds a copy of each photograph."""
    natural, extra, side = build_prior.NATURAL, build_prior.EXTRA, build_prior.MAX_SIDE
    rng = np.random.default_rng(0)
    shapes = {name: (300, 200) for name in natural + extra}
    shapes["retina"] = (1411, 1411)
    npz = tmp_path / "clean.npz"
    np.savez(npz, **{k: rng.random(v, dtype=np.float32) for k, v in shapes.items()})
    base = build_prior.clean_images(1, str(npz))
    assert len(base) == len(natural) + 1 and base[natural.index("retina")].shape == (1411, 1411)
    assert base[-1].shape == (256, 256)  # the phantom
    names = build_prior.photo_names("more")
    assert "chelsea" not in names and set(extra) <= set(names) and len(names) == len(natural) + 3
    more = build_prior.clean_images(0, str(npz), photos="more", scales=(1.0, 0.5))
    assert len(more) == 2 * len(names)
    assert more[names.index("retina")].shape == (side, side)
    assert more[len(names) + names.index("retina")].shape == (side // 2, side // 2)
    assert more[len(names)].shape == (150, 100) and more[0].shape == (300, 200)
    with pytest.raises(ValueError, match="photos"):
        build_prior.photo_names("all")


def test_a_prior_that_went_on_from_another_records_both_recipes(tiny_model, tmp_path):
    tiny_model.info["prior"] = {"steps": 7, "photos": "first"}
    tiny_model.save(tmp_path / "first.hdn")
    second = build_prior.continued({"steps": 3}, str(tmp_path / "first.hdn"))
    assert second["total_steps"] == 10 and second["continued_from"]["photos"] == "first"
    tiny_model.info["prior"] = second
    tiny_model.save(tmp_path / "second.hdn")
    assert build_prior.continued({"steps": 5}, str(tmp_path / "second.hdn"))["total_steps"] == 15
