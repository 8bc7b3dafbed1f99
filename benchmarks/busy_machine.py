"""Training-step time alone and beside a second training (the "busy machine" of issue 8).

    python -m benchmarks.busy_machine --seconds 60

Runs the fast CPU preset's training in fresh processes: one alone, then two at once, first with
the default adaptive thread count (``threads=None``, engine/threads.py), then with every process
fixed at all cores (torch's default before the governor). Prints the median seconds per step of
each process (the first 10 steps skipped, or the first quarter when there are fewer than 40) and
the slowdown against the one alone. Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import numpy as np, torch
from napari_hdn.engine import PoissonGaussianNoiseModel, Trainer
from napari_hdn.engine.training.presets import get_preset
from benchmarks.time_to_quality import spec_data

seconds, threads = float(sys.argv[1]), (None if sys.argv[2] == "auto" else int(sys.argv[2]))
noisy, _, (g, r, o) = spec_data()
p = get_preset("fast CPU")
times, counts = [], []
last = [None]
def on(ev):
    if ev.kind == "step":
        now = time.perf_counter()
        if last[0] is not None:
            times.append(now - last[0])
            counts.append(ev.metrics["threads"])
        last[0] = now
tcfg = p.training_config(max_steps=10**6, time_budget_s=seconds, val_fraction=0.0, device="cpu",
                         threads=threads, steps_per_epoch=10**6)
Trainer(noisy, PoissonGaussianNoiseModel(g, r, o), model_config=p.model_config(),
        training_config=tcfg, callbacks=on).run()
skip = min(10, len(times) // 4)  # the first steps (allocation, the governor's first try)
print(json.dumps({"times": times[skip:], "threads": counts[skip:]}))
"""


def _run(n: int, seconds: float, threads: str) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(seconds), threads],
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="training seconds of each run")
    a = ap.parse_args(argv)
    import os

    cores = str(os.cpu_count() or 1)
    alone = statistics.median(_run(1, a.seconds, "auto")[0]["times"])
    print(f"alone (adaptive threads): {alone:.3f} s/step")
    for label, threads in (("adaptive threads", "auto"), (f"fixed {cores} threads each", cores)):
        res = _run(2, a.seconds, threads)
        for i, r in enumerate(res):
            med = statistics.median(r["times"])
            share = statistics.mean(r["threads"]) if r["threads"] else float("nan")
            half = r["times"][len(r["times"]) // 2:]  # the steady state, after the governor's tries
            late = statistics.median(half) if half else float("nan")
            late_threads = r["threads"][len(r["threads"]) // 2:]
            print(f"two at once, {label}: process {i + 1} {med:.3f} s/step "
                  f"({med / alone:.2f}x alone; mean threads {share:.2f}); second half "
                  f"{late:.3f} s/step ({late / alone:.2f}x alone; threads "
                  f"{statistics.mean(late_threads) if late_threads else float('nan'):.2f}; "
                  f"{len(r['times'])} steps)")


if __name__ == "__main__":
    main()
