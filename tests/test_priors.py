"""Where a new run starts: the bundled prior, scratch, or a model file (engine/priors.py)."""

import numpy as np
import pytest
import tifffile
import torch
from _helpers import TINY, smooth_image

from napari_hdn.engine import GaussianNoiseModel, InputError, Trainer, TrainingConfig, load_model
from napari_hdn.engine.data.arrays import Normalisation
from napari_hdn.engine.training.presets import get_preset
from napari_hdn.engine.training.priors import PRIORS_DIR, bundled_prior_for, bundled_priors


def _noisy(seed=0, shape=(64, 64)):
    rng = np.random.default_rng(seed)
    return (smooth_image(shape, seed) + rng.normal(0, 5, shape)).astype(np.float32)


def test_the_bundled_prior_fits_the_fast_preset_and_says_how_it_was_made():
    fast = get_preset("fast CPU")
    assert fast.training["init"] == "prior"
    assert bundled_prior_for(fast.model_config()) == "fast-cpu.hdn"
    # dropout, free bits and withheld levels change no weight; sizes do
    assert bundled_prior_for(fast.model_config(dropout=0.3, free_bits=0.5,
                                               deactivated_levels=[1])) == "fast-cpu.hdn"
    # dropout 0 removes a module without weights: the prior's weights still load, renumbered
    assert bundled_prior_for(fast.model_config(dropout=0.0)) == "fast-cpu.hdn"
    assert bundled_prior_for(fast.model_config(filters=48)) is None
    assert bundled_prior_for(fast.model_config(batchnorm=False)) is None
    assert bundled_prior_for(get_preset("paper").model_config()) is None
    [(name, cfg, recipe)] = bundled_priors()
    assert name == "fast-cpu.hdn" and cfg.levels == fast.model["levels"]
    # trained on images that no benchmark scores
    assert set(recipe["never_used"]) >= {"camera", "astronaut", "coins", "cell"}
    images = recipe["images"]  # the shipped file names them "scikit-image", newer builds "photographs"
    assert not set(images.get("photographs", images.get("scikit-image"))) & set(recipe["never_used"])
    assert recipe["steps"] > 1000
    model = load_model(PRIORS_DIR / name)  # an ordinary, safe model file
    assert model.config.blocks == fast.model["blocks"]


def test_a_run_from_the_prior_takes_its_weights_and_keeps_this_datas_noise_model_and_scale():
    fast = get_preset("fast CPU")
    img = _noisy()
    noise = GaussianNoiseModel(5.0)
    tcfg = fast.training_config(max_steps=1, val_fraction=0.0, device="cpu", batch_size=2)
    tr = Trainer(img, noise, model_config=fast.model_config(), training_config=tcfg)
    prior = load_model(PRIORS_DIR / "fast-cpu.hdn")
    start = tr.model.ladder.state_dict()
    for k, v in prior.ladder.state_dict().items():
        assert torch.equal(start[k], v), k
    assert tr.model.noise_model is noise
    assert tr.model.normalisation == Normalisation.from_frames([img])
    assert tr.model.normalisation != prior.normalisation
    rec = tr.model.info["start"]
    assert rec["init"] == "prior" and rec["file"] == "fast-cpu.hdn" and len(rec["sha256"]) == 64
    model = tr.run()
    assert model.info["start"]["init"] == "prior" and model.info["steps"] == 1
    # scratch is a fresh network
    tr = Trainer(img, noise, model_config=fast.model_config(),
                 training_config=tcfg.model_copy(update={"init": "scratch"}))
    assert tr.model.info["start"] == {"init": "scratch"}
    fresh = tr.model.ladder.state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in prior.ladder.state_dict().items())


def test_a_run_can_start_from_an_earlier_model_of_the_same_sizes(tmp_path):
    img = _noisy()
    from napari_hdn.engine import ModelConfig

    tcfg = TrainingConfig(patch_size=32, batch_size=2, max_steps=2, val_fraction=0.0, device="cpu")
    first = Trainer(img, GaussianNoiseModel(5.0), model_config=ModelConfig(**TINY),
                    training_config=tcfg).run()
    path = first.save(tmp_path / "first.hdn")
    tr = Trainer(_noisy(1), GaussianNoiseModel(7.0), model_config=ModelConfig(**TINY),
                 training_config=tcfg.model_copy(update={"init": str(path)}))
    for k, v in first.ladder.state_dict().items():
        assert torch.equal(tr.model.ladder.state_dict()[k], v), k
    assert tr.model.noise_model.sigma == 7.0
    assert tr.model.info["start"]["init"] == "model file"
    # the command line: --init MODEL, and the saved model says where it started
    from napari_hdn.cli import main

    tifffile.imwrite(tmp_path / "x.tif", _noisy(2))
    args = ["train", str(tmp_path / "x.tif"), "--gaussian-sigma", "5", "--levels", "2",
            "--z-dim", "2", "--filters", "8", "--blocks", "1", "--max-steps", "1",
            "--patch-size", "32", "--val-fraction", "0", "--quiet", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "b.hdn"), "--init", str(path)]) == 0
    assert load_model(tmp_path / "b.hdn").info["start"]["file"] == str(path.resolve())
    before = path.read_bytes()
    assert main([*args, "--out", str(path), "--init", str(path), "--overwrite"]) == 1  # its input
    assert path.read_bytes() == before
    # wrong sizes, a missing file, the prior for sizes it does not fit: errors that name the fix
    with pytest.raises(InputError, match="does not fit"):
        Trainer(img, GaussianNoiseModel(5.0), model_config=ModelConfig(**{**TINY, "filters": 12}),
                training_config=tcfg.model_copy(update={"init": str(path)}))
    with pytest.raises(InputError, match="neither 'scratch', 'prior' nor an existing model file"):
        Trainer(img, GaussianNoiseModel(5.0), model_config=ModelConfig(**TINY),
                training_config=tcfg.model_copy(update={"init": str(tmp_path / "none.hdn")}))
    with pytest.raises(InputError, match="no bundled prior fits.*init='scratch'"):
        Trainer(img, GaussianNoiseModel(5.0), model_config=ModelConfig(**TINY),
                training_config=tcfg.model_copy(update={"init": "prior"}))


def _train_args(*extra):
    from napari_hdn.cli import build_parser

    return build_parser().parse_args(["train", "x.tif", "--out", "m.hdn", *extra])


def test_cli_init_option(tmp_path, capsys):
    from napari_hdn.cli import CLIError, main
    from napari_hdn.cli.train import configs_from_args

    _, tcfg, _ = configs_from_args(_train_args())
    assert tcfg.init == "prior"  # the default preset starts from the prior
    _, tcfg, _ = configs_from_args(_train_args("--init", "scratch"))
    assert tcfg.init == "scratch"
    # sizes the prior does not fit start from scratch, and say so
    mcfg, tcfg, _ = configs_from_args(_train_args("--filters", "8"))
    assert tcfg.init == "scratch" and "no bundled prior fits" in capsys.readouterr().err
    with pytest.raises(CLIError, match="--init"):
        configs_from_args(_train_args("--resume", "c.hdn", "--init", "prior"))
    # asked for explicitly with sizes it does not fit: a clear error, no file
    tifffile.imwrite(tmp_path / "x.tif", _noisy())
    out = tmp_path / "m.hdn"
    rc = main(["train", str(tmp_path / "x.tif"), "--out", str(out), "--gaussian-sigma", "5",
               "--levels", "2", "--z-dim", "2", "--filters", "8", "--init", "prior",
               "--max-steps", "1", "--patch-size", "32", "--val-fraction", "0", "--quiet",
               "--device", "cpu"])
    assert rc == 1 and not out.exists()
    assert "no bundled prior fits" in capsys.readouterr().err


def test_training_widget_offers_the_prior_for_the_sizes_it_fits(viewer):
    from _widget_helpers import dock, set_tiny

    tw = dock(viewer, "Training")
    prior_item = tw.init_combo.model().item(tw.init_combo.findData("prior"))
    assert tw.preset.currentText() == "fast CPU"
    assert tw.init_combo.currentData() == "prior" and tw.training_config().init == "prior"
    tw.filters.setValue(48)  # sizes no bundled prior fits: scratch, and the prior greyed out
    assert tw.init_combo.currentData() == "scratch" and not prior_item.isEnabled()
    assert tw.training_config().init == "scratch"
    tw.preset.setCurrentText("fast CPU")
    assert tw.init_combo.currentData() == "prior" and prior_item.isEnabled()
    tw.init_combo.setCurrentIndex(tw.init_combo.findData("scratch"))  # the user's choice stands
    assert tw.training_config().init == "scratch"
    tw.preset.setCurrentText("paper")
    assert tw.init_combo.currentData() == "scratch" and not prior_item.isEnabled()
    set_tiny(tw)
    assert tw.training_config().init == "scratch"
