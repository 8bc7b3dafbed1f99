import torch
from _helpers import TINY

from napari_hdn import bench
from napari_hdn.engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation


def test_conv_flop_count_matches_hand_count():
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**TINY), GaussianNoiseModel(1.0), Normalisation(0.0, 1.0))
    x = torch.randn(2, 1, 16, 16)
    flops = bench.conv_flops_per_forward(model, x)
    # the stem conv alone: 2 * (1*5*5) MACs per output element * (2*8*16*16) outputs
    assert flops > 2 * 25 * 2 * 8 * 16 * 16
    # doubling the batch doubles the count exactly
    assert bench.conv_flops_per_forward(model, torch.randn(4, 1, 16, 16)) == 2 * flops


def test_bench_tasks_report_figures():
    arch = dict(TINY)
    r = bench.task_train("cpu", arch, 8, 16, "sequential", 1)
    assert r["steps_per_s"] > 0 and r["conv_gflop_per_step"] > 0 and r["peak_memory_mb"] > 0
    g = bench.task_train("cpu", arch, 8, 16, "ghost", 1)
    assert g["conv_gflop_per_step"] == r["conv_gflop_per_step"]  # same work, other schedule
    p = bench.task_predict("cpu", arch, 32, 4, True)
    q = bench.task_predict("cpu", arch, 32, 4, False)
    assert p["seconds"] > 0 and q["seconds"] > 0
    lat = bench.task_toggle_latency("cpu", arch, 32, 2, 2)
    assert lat["median_seconds"] > 0
    tm = bench.task_tiled_memory("cpu", arch, 64, 32, 1)
    assert tm["tiles"] > 1
