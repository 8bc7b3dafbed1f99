"""PSNR of the striped sample restored with different latent levels switched off (engine only).

Trains the "fast CPU" preset (engine/presets.py) with batch 8 and 300 steps (as in
scripts/make_screenshots.py) on the striped sample with a GMM noise model fitted on the calibration
sample, then predicts with each level setting and prints the PSNR against the ground truth::

    python -m benchmarks.artefact_levels_psnr       # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from napari_hdn.engine import Trainer
    from napari_hdn.engine.metrics import psnr
    from napari_hdn.engine.noise import fit_from_calibration
    from napari_hdn.engine.training.presets import get_preset
    from napari_hdn.synthetic import calibration_stack, striped_fluorescence

    torch.set_num_threads(args.threads)
    s = striped_fluorescence()
    nm = fit_from_calibration(calibration_stack())
    fast = get_preset("fast CPU")
    trainer = Trainer(s.noisy, nm, model_config=fast.model_config(),
                      training_config=fast.training_config(batch_size=8, max_steps=args.steps,
                                                           steps_per_epoch=25, device="cpu", seed=0))
    t = time.perf_counter()
    model = trainer.run()
    print(f"trained {args.steps} steps in {time.perf_counter() - t:.0f} s")
    print(f"{'input (noisy)':<34} PSNR {psnr(s.noisy, s.clean):6.2f} dB")
    settings = [None, {1: "prior-sample"}, {1: "prior-sample", 2: "prior-sample"},
                {1: "prior-mean"}, {2: "prior-mean"}, {1: "prior-mean", 2: "prior-mean"},
                {1: "zero"}, {1: "zero", 2: "zero"}]
    for modes in settings:
        r = model.predict(s.noisy, n_samples=args.samples, levels=modes)
        label = "all levels on" if not modes else ", ".join(f"{k} {v}" for k, v in modes.items())
        print(f"{label:<34} PSNR {psnr(r.mmse, s.clean):6.2f} dB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
