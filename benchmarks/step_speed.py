"""Training-step time of two source trees side by side (e.g. a `git worktree` of an old commit).

    python -m benchmarks.step_speed --old /work/wt-base --new . --rounds 3

Each measurement runs in a fresh subprocess whose PYTHONPATH points at one tree's ``src``; the
trees alternate (old, new, old, new, ...) so that drifts of the machine hit both alike. A step is
``Trainer.train_step()`` (patch sampling, augmentation, forward, backward, optimiser) with each
tree's own defaults for everything not given below. Prints medians and the new/old ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ._child import run_in_tree

CONFIGS = {
    # the two comparison configurations
    "small": (dict(levels=4, z_dim=32, filters=32, blocks=3), 16),
    "paper": (dict(levels=6, z_dim=32, filters=64, blocks=5), 64),
    # the "fast CPU" preset's network
    "fast": (dict(levels=4, z_dim=32, filters=32, blocks=1, dropout=0.1), 16),
}

_CHILD = r"""
import json, sys, time, statistics
import numpy as np, torch
from napari_hdn.engine import Trainer, TrainingConfig, ModelConfig, PoissonGaussianNoiseModel
arch, batch, steps, threads, extra = json.loads(sys.argv[1])
torch.set_num_threads(threads)
rng = np.random.default_rng(0)
img = (100 + rng.poisson(50 + 40 * rng.random((4, 256, 256))) * 2.0).astype(np.float32)
tc = dict(patch_size=64, batch_size=batch, val_fraction=0.0, seed=0, device="cpu", max_steps=10**6)
tc.update(extra)
tr = Trainer(img, PoissonGaussianNoiseModel(2.0, 5.0, 100.0), axes="SYX",
             model_config=ModelConfig(**arch), training_config=TrainingConfig(**tc))
tr.model.ladder.train()
try:  # what Trainer.run does on a CPU, in trees that have it
    from napari_hdn.engine.heap import keep_heap
except ImportError:
    from contextlib import nullcontext as keep_heap
with keep_heap():
    for _ in range(2):
        tr.train_step()
    times = []
    for _ in range(steps):
        t = time.perf_counter(); tr.train_step(); times.append(time.perf_counter() - t)
import resource
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"median": statistics.median(times), "times": times, "peak_rss_mb": rss}))
"""


def measure(tree: Path, arch: dict, batch: int, steps: int, threads: int, extra: dict) -> dict:
    return run_in_tree(tree, _CHILD, [arch, batch, steps, threads, extra])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="source tree of the baseline (has src/napari_hdn)")
    ap.add_argument("--new", default=".", help="source tree of the new code")
    ap.add_argument("--configs", default="small,paper")
    ap.add_argument("--rounds", type=int, default=3, help="alternating old/new rounds")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round (small config)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-extra", default="{}", help="JSON TrainingConfig fields for the new tree")
    ap.add_argument("--new-arch", default="{}", help="JSON ModelConfig fields for the new tree")
    a = ap.parse_args(argv)
    extra_new, arch_new = json.loads(a.new_extra), json.loads(a.new_arch)
    for name in a.configs.split(","):
        arch, batch = CONFIGS[name]
        steps = max(2, a.steps // 4) if name == "paper" else a.steps
        res: dict[str, list[float]] = {"old": [], "new": []}
        rss: dict[str, float] = {"old": 0.0, "new": 0.0}
        for _ in range(a.rounds):
            for which, tree, extra, arch_t in (("old", a.old, {}, arch),
                                               ("new", a.new, extra_new, {**arch, **arch_new})):
                out = measure(Path(tree), arch_t, batch, steps, a.threads, extra)
                res[which] += out["times"]
                rss[which] = max(rss[which], out.get("peak_rss_mb", 0.0))
        mo, mn = statistics.median(res["old"]), statistics.median(res["new"])
        print(f"{name:6s} batch {batch:3d}: old {mo:.3f} s/step, new {mn:.3f} s/step, "
              f"new/old time {mn / mo:.2f} (speed {mo / mn:.2f}x); {len(res['old'])} steps each; "
              f"peak resident memory old {rss['old']:.0f} MB, new {rss['new']:.0f} MB")


if __name__ == "__main__":
    main()
