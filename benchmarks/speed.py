"""Engine speed/memory benchmark: ``python benchmarks/speed.py [--quick] [--json FILE]``.

Same as ``napari-hdn bench``; see ``napari_hdn.bench`` for what is measured and how. The full
benchmark suite (``python -m benchmarks``) adds tiled prediction memory, preview latency and the
noise-model fit time.
"""

import argparse

from napari_hdn.bench import run_speed_benchmark

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small configuration only")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="write figures to this JSON file")
    a = ap.parse_args()
    run_speed_benchmark(quick=a.quick, device=a.device, json_out=a.json)
