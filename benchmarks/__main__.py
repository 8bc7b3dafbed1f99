"""``python -m benchmarks [--quick]``: run the benchmark suite and regenerate docs/benchmarks.md."""

import argparse

from .run import rewrite_report, run

ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
ap.add_argument("--quick", action="store_true", help="small images and budgets (a few minutes)")
ap.add_argument("--profile", choices=["smoke", "quick", "core", "full"],
                help="a named profile (benchmarks/run.py PROFILES); default full (quick with --quick)")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
ap.add_argument("--lock", metavar="FILE", help="hold this lock file (flock) while measuring each "
                "dataset, so that other jobs honouring it wait instead of distorting the timings")
ap.add_argument("--reuse-n2v", metavar="RESULTS", help="take Noise2Void's figures from this earlier "
                "results file of the same profile and seed instead of training it again")
ap.add_argument("--datasets", metavar="NAMES", help="comma-separated: measure only these datasets "
                "(default: the profile's)")
ap.add_argument("--keep", metavar="RESULTS", help="carry the datasets this run does not measure over "
                "from this earlier results file of the same profile and seed (marked as such)")
ap.add_argument("--report", metavar="RESULTS", help="measure nothing: write the report of this saved "
                "results file again (e.g. benchmarks/results/core.json)")
a = ap.parse_args()
if a.report:
    print(rewrite_report(a.report))
    raise SystemExit(0)
run(a.profile or ("quick" if a.quick else "full"), seed=a.seed, docs=not a.no_docs, lock=a.lock,
    reuse_n2v=a.reuse_n2v, datasets=a.datasets.split(",") if a.datasets else None, keep=a.keep)
