"""napari-hdn benchmark suite: restoration quality against baselines, speed and memory.

Run ``python -m benchmarks --quick`` (minutes) or ``python -m benchmarks`` (full, about an hour on
a 2-core CPU). Results go to ``benchmarks/results/*.json`` and ``docs/benchmarks.md``.
What each module is for, and the finished experiments that left the tree: benchmarks/README.md.
"""
