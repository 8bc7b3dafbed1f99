"""What the bundled prior is worth: MMSE PSNR against optimiser steps, from the prior and from scratch.

The core benchmark's data (``fluo100``, ``natural25``: 3 images of 256x256, the GMM fitted from the
calibration stack as the benchmark does) are trained on with the fast preset, once starting from
a prior (the bundled one, or one made first with ``--pretrain-seconds``) at one or more learning
rates, once from scratch; each variant in its own process, all at once (meant for a GPU, where
step counts are what transfers; read them against the CPU seconds per step of the preset). At
each mark (and at step 0 for the prior) the MMSE of ``--samples`` samples on all 3 images is
scored. Rows are printed and appended to ``--jsonl`` as they come.

    python -m benchmarks.prior_gain --device cuda --jsonl prior.jsonl
    python -m benchmarks.prior_gain --device cuda --pretrain-seconds 300 --prior new-prior.hdn
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_VARIANTS = ("fluo100:prior:5e-3,fluo100:prior:2e-3,fluo100:prior:1e-3,fluo100:scratch:5e-3,"
                    "natural25:prior:5e-3,natural25:prior:2e-3,natural25:prior:1e-3,"
                    "natural25:scratch:5e-3")


def run_variant(variant: str, device: str, prior: str, cache: str, jsonl: str | None, marks,
                samples: int) -> None:
    """``variant`` = ``data:start:lr[:noise][:key=value ...]`` with start ``prior`` or ``scratch``,
    noise ``gmm`` (the GMM fitted from the calibration stack, the default) or ``true`` (the noise
    that made the data), and ``key=value`` overrides of the preset's training settings (e.g.
    ``patch_size=96:batch_size=8``; ``init=PRIOR.hdn`` starts this variant from another prior;
    keys of the model's settings that change no weight, e.g. ``dropout=0``, go to the model;
    ``top_down_lr_scale=F`` runs the top-down path and the output layer at F times the rate of
    the bottom-up path, see :func:`split_rates`)."""
    import torch

    from napari_hdn.engine import ModelConfig, Trainer
    from napari_hdn.engine.metrics import psnr
    from napari_hdn.engine.training.presets import get_preset

    from .recipe_grid import _data, _noise_model

    torch.set_num_threads(1)
    dsname, start, lr, noise, overrides = parse_variant(variant)
    ds = _data(dsname)
    preset = get_preset("fast CPU")
    init = overrides.pop("init", prior) if start == "prior" else "scratch"
    model_overrides = {k: overrides.pop(k) for k in list(overrides) if k in ModelConfig.model_fields}
    top_down_scale = overrides.pop("top_down_lr_scale", None)
    tcfg = preset.training_config(val_fraction=0.0, device=device, seed=0, max_steps=marks[-1],
                                  lr=lr, init=init, **overrides)
    tr = Trainer(list(ds.noisy), _noise_model(ds, noise, Path(cache)),
                 model_config=preset.model_config(**model_overrides), training_config=tcfg)
    if top_down_scale is not None:
        split_rates(tr, float(top_down_scale))
    t0 = time.perf_counter()

    def score(model, step: int) -> None:
        preds = [model.predict(x, n_samples=samples, seed=0).mmse for x in ds.noisy]
        each = [float(psnr(p, c)) for p, c in zip(preds, ds.clean)]
        row = {"variant": variant, "steps": step, "wall_s": round(time.perf_counter() - t0, 1),
               "psnr": float(np.mean(each)), "per_image": [round(v, 3) for v in each]}
        print(json.dumps(row), flush=True)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")

    if start == "prior":
        score(tr.snapshot(), 0)

    def on_step(ev):
        if ev.kind == "step" and ev.step in marks[:-1]:
            score(tr.snapshot(), ev.step)

    tr.report.callbacks.append(on_step)
    score(tr.run(), tr.step)


def split_rates(tr, top_down_scale: float) -> None:
    """Give the trainer's Adamax two parameter groups: the bottom-up path (stem and encoder levels)
    at the run's rate, the top-down path and the output layer (the prior and decoder a fine-tune
    adapts) at ``top_down_scale`` times it. The warm-up sets one rate for all groups; the scale is
    applied after it, and the plateau scheduler halves each group's rate alike (benchmark only)."""
    import torch

    cfg = tr.tcfg
    enc, dec = [], []
    for name, p in tr.model.ladder.named_parameters():
        (enc if name.split(".")[0] in ("stem", "bottom_up_levels") else dec).append(p)
    tr.optimizer = torch.optim.Adamax([{"params": enc, "scale": 1.0},
                                       {"params": dec, "scale": top_down_scale}], lr=cfg.lr)
    tr.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        tr.optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    warmup = tr._warmup_lr

    def scaled_warmup() -> None:
        warmup()
        if cfg.lr_schedule != "plateau" or tr.step <= cfg.warmup_steps:  # the rate was just set
            for g in tr.optimizer.param_groups:
                g["lr"] *= g["scale"]

    tr._warmup_lr = scaled_warmup


def parse_variant(variant: str) -> tuple[str, str, float, str, dict]:
    """``data:start:lr[:noise][:key=value ...]`` -> (data, start, lr, noise, training overrides);
    values read as Python literals where they are one (``patch_size=96`` gives the int 96)."""
    import ast

    dsname, start, lr, *rest = variant.split(":")
    if start not in ("prior", "scratch"):
        raise ValueError(f"variant {variant!r}: start must be 'prior' or 'scratch'")
    overrides, noise = {}, "gmm"
    for part in rest:
        if "=" not in part:
            if part not in ("gmm", "true"):
                raise ValueError(f"variant {variant!r}: noise must be 'gmm' or 'true', not {part!r}")
            noise = part
            continue
        key, value = part.split("=", 1)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    if start == "scratch" and "init" in overrides:
        raise ValueError(f"variant {variant!r}: init= names the prior to start from; a 'scratch' "
                         "variant starts from none (use start 'prior' with init=PRIOR.hdn)")
    return dsname, start, float(lr), noise, overrides


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prior", default="prior", help="'prior' (the bundled one) or a model file")
    ap.add_argument("--pretrain-seconds", type=float, default=None,
                    help="first make a prior (benchmarks/pretrain_prior.py) into --prior")
    ap.add_argument("--clean-npz", default=None, help="see benchmarks/pretrain_prior.py")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--marks", default="100,325,650,1300")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--jsonl", default=None)
    a = ap.parse_args(argv)
    if a.pretrain_seconds:
        from .pretrain_prior import pretrain

        pretrain(a.device, a.pretrain_seconds, 64, 48, a.prior, a.clean_npz)  # the shipped recipe
    from napari_hdn.engine.noise.fitting import fit_from_calibration

    from .recipe_grid import _data

    cache = Path(tempfile.mkdtemp(prefix="hdn-prior-gain-"))
    names = a.variants.split(",")
    parsed = [parse_variant(n) for n in names]  # a bad variant is refused before any work starts
    for dsname in sorted({p[0] for p in parsed}):
        fit_from_calibration(_data(dsname).calibration, kind="gmm", device="cpu", seed=0).save(
            cache / f"{dsname}.hdnn")
    marks = tuple(int(m) for m in a.marks.split(","))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.get_context("spawn").Pool(len(names)) as pool:
        pool.starmap(run_variant, [(n, a.device, a.prior, str(cache), a.jsonl, marks, a.samples)
                                   for n in names])


if __name__ == "__main__":
    main()
