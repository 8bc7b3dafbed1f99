"""The end of a run: held rate vs cool-down vs weight average vs snapshot ensemble, same run.

At a constant high learning rate the weights wander (the recipe grid saw single marks move by up
to 1 dB), so what a run returns depends on where it happens to stop. This script trains the fast
preset once on one of the core benchmark's data sets (3 images of 256x256, the GMM fitted from the
calibration stack as the benchmark does) and scores, at each mark (optimiser steps), the MMSE of
100 antithetic samples on all 3 images with:

- ``constant``: the weights at the mark (what the preset returned before);
- ``cooldown``: a branch saved at ``(1 - fraction) * mark`` and trained on to the mark with the rate
  lowered linearly to ~0 (the ``lr_schedule="cooldown"`` of a run that long; up to the branch point
  it is the same run);
- ``ema``: the exponential moving average of the weights (and BatchNorm statistics), ``--ema``;
- ``ensemble4``: 25 samples from each of the weights at mark - 150, - 100, - 50 and the mark.

Step counts, not minutes, so a busy machine slows it but does not change its figures.

    python -m benchmarks.recipe_tail --data fluo100 --seed 0 --marks 800,1600
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np


def run(data: str, seed: int, marks: tuple[int, ...], fraction: float, ema_decay: float,
        samples: int = 100, log=print) -> list[dict]:
    import torch

    from napari_hdn.engine import Trainer
    from napari_hdn.engine.metrics import psnr
    from napari_hdn.engine.training.presets import get_preset

    from .datasets import make_datasets
    from .learned import calibration_noise_model

    ds = next(d for d in make_datasets(256, 3, 0) if d.name == data)
    nm = calibration_noise_model(ds.calibration, 0)
    preset = get_preset("fast CPU")
    # the trainer keeps the weight average (ema_decay) beside the raw weights it trains
    tcfg = preset.training_config(val_fraction=0.0, device="cpu", seed=seed, max_steps=10**6,
                                  ema_decay=ema_decay, lr_schedule="plateau")
    tr = Trainer(list(ds.noisy), nm, model_config=preset.model_config(), training_config=tcfg)
    tr.model.ladder.train()
    ladder = tr.model.ladder

    def as_model(state):
        m = copy.copy(tr.model)
        m.info = dict(tr.model.info)
        m.ladder = copy.deepcopy(ladder)
        m.ladder.load_state_dict(state)
        m.ladder.eval()
        return m

    def score(states) -> tuple[float, list[float]]:
        preds = []
        for x in ds.noisy:
            acc = sum(as_model(s).predict(x, n_samples=samples // len(states), seed=0).mmse
                      .astype(np.float64) for s in states)
            preds.append(acc / len(states))
        per = [psnr(a, b) for a, b in zip(preds, ds.clean)]
        return round(float(np.mean(per)), 3), [round(v, 2) for v in per]

    def step(lr=None):
        if lr is not None:  # after the warm-up the trainer leaves the rate to the caller
            for g in tr.optimizer.param_groups:
                g["lr"] = lr
        tr.train_step()
        tr.step += 1

    weights = tr._live_state  # the raw weights (current_state() would be the average)
    snaps, branches = {}, {}
    starts = {int(m * (1 - fraction)): m for m in marks}
    t0 = time.perf_counter()
    for _ in range(max(marks)):
        if tr.step in starts:
            branches[starts[tr.step]] = (tr.step, weights(), copy.deepcopy(tr.optimizer.state_dict()),
                                         tr.gen.get_state(), torch.get_rng_state())
        step()
        for m in marks:
            if tr.step in (m - 150, m - 100, m - 50, m):
                snaps[tr.step] = weights()
            if tr.step == m:
                snaps["ema", m] = {k: v.clone() for k, v in tr.ema.items()}
        if tr.step % 100 == 0:
            log(f"# step {tr.step}, {time.perf_counter() - t0:.0f} s")
    peak = tcfg.lr
    for m in marks:
        b0, state, opt, gen, rng = branches[m]
        ladder.load_state_dict(state)
        tr.optimizer.load_state_dict(opt)
        tr.gen.set_state(gen)
        torch.set_rng_state(rng)
        tr.step = b0
        for s in range(b0, m):
            step(peak * max(0.0, 1.0 - (s - b0 + 1) / (m - b0)) + 1e-6)
        snaps["cooldown", m] = weights()
    rows = []
    for m in marks:
        for name, states in (("constant", [snaps[m]]), ("cooldown", [snaps["cooldown", m]]),
                             ("ema", [snaps["ema", m]]),
                             ("ensemble4", [snaps[m - 150], snaps[m - 100], snaps[m - 50], snaps[m]])):
            p, per = score(states)
            rows.append({"data": data, "seed": seed, "steps": m, "variant": name, "psnr": p,
                         "per_image": per})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="fluo100", help="fluo100 or natural25 (the core benchmark's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--marks", default="800,1600", help="optimiser steps, each above 150")
    ap.add_argument("--fraction", type=float, default=0.25, help="cool-down part of each run")
    ap.add_argument("--ema", type=float, default=0.995, help="weight-average decay")
    ap.add_argument("--samples", type=int, default=100, help="MMSE samples (a multiple of 4)")
    args = ap.parse_args(argv)
    marks = tuple(sorted(int(v) for v in args.marks.split(",")))
    if marks[0] <= 150:
        ap.error("marks must be above 150 steps (the ensemble reaches 150 steps back)")
    run(args.data, args.seed, marks, args.fraction, args.ema, samples=args.samples,
        log=lambda s: print(s, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
