"""``python -m benchmarks [--quick]``: run the benchmark suite and regenerate docs/benchmarks.md."""

import argparse

from .run import run

ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
ap.add_argument("--quick", action="store_true", help="small images and budgets (a few minutes)")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
a = ap.parse_args()
run("quick" if a.quick else "full", seed=a.seed, docs=not a.no_docs)
