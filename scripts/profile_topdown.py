"""Time and profile one posterior sample's top-down pass (the artefact preview's work) on the CPU.

    python scripts/profile_topdown.py --preset "fast CPU" --side 256 --threads 1

Untrained weights of the preset's architecture (a pass costs the same whatever the weights), the
inference copy of the network (folded BatchNorm, channels-last), level 1 at its prior mean as in a
preview after a toggle. Prints the median time of one sample and torch's profile by operator and by
input shape: what the preview latency (scripts/preview_latency.py) is made of outside the widget.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="fast CPU")
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=20, help="rows of each profile table")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from napari_hdn.engine import GaussianNoiseModel, HDNModel, Normalisation
    from napari_hdn.engine.prediction.sampling import inference_model
    from napari_hdn.engine.training.presets import get_preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(args.preset).model_config()
    model = HDNModel(cfg, GaussianNoiseModel(3.0), Normalisation(130.0, 20.0))
    model.ladder.eval()
    img = np.random.default_rng(0).normal(130.0, 20.0, (args.side, args.side)).astype(np.float32)
    sampler = inference_model(model).sampler(img)
    modes = ["prior-mean"] + ["posterior"] * (cfg.levels - 1)
    for _ in range(2):
        sampler.sample(1, modes, seed=0)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        sampler.sample(1, modes, seed=0)
        times.append(time.perf_counter() - t)
    print(f"{args.preset} (L{cfg.levels} z{cfg.z_dim} F{cfg.filters} B{cfg.blocks}), "
          f"{args.side}x{args.side}, {args.threads} thread(s): one sample's top-down "
          f"{statistics.median(times):.3f} s median (min {min(times):.3f})")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        sampler.sample(1, modes, seed=0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_shapes_column_width=80))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
