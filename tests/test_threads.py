"""The CPU thread governor: fast on a quiet machine, few threads while another job competes."""

import pytest
import torch

from napari_hdn.engine.threads import ThreadGovernor


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def simulate(gov, phases):
    """phases: list of (steps, {threads: seconds per step}); returns the counts used per step."""
    used = []
    for steps, table in phases:
        for _ in range(steps):
            k = torch.get_num_threads()
            used.append(k)
            gov.observe(table[k])
    return used


QUIET = {2: 0.85, 1: 1.6}  # measured on a 2-core machine: one training alone
BUSY = {2: 15.0, 1: 1.7}  # the same with a second 2-thread training beside it


def test_quiet_machine_keeps_all_threads_and_tries_others_rarely():
    gov = ThreadGovernor(2)
    used = simulate(gov, [(1000, QUIET)])
    cost = sum(QUIET[k] for k in used) / (1000 * QUIET[2]) - 1
    assert cost < 0.02  # tries of 1 thread cost under 2 %
    assert used[-100:].count(2) >= 97
    assert gov.interval[1] == gov.max_interval  # 1 thread lost every try, so it is tried rarely


def test_competing_job_is_met_with_fewer_threads_and_left_when_it_ends():
    gov = ThreadGovernor(2)
    used = simulate(gov, [(100, QUIET), (600, BUSY), (400, QUIET)])
    busy = used[100:700]
    assert busy[5:].count(1) > 0.95 * len(busy[5:])  # switched within a few steps
    cost = sum(BUSY[k] for k in busy) / (600 * BUSY[1]) - 1
    assert cost < 0.10  # within 10 % of knowing the right count in advance
    # back to 2 threads within one (longest) try interval after the other job ended
    assert used[700 + gov.max_interval + 5:].count(2) > 0.95 * len(used[700 + gov.max_interval + 5:])


def test_a_machine_busy_from_the_start_is_met_within_a_minute():
    gov = ThreadGovernor(2)
    used = simulate(gov, [(40, BUSY)])
    first_one = used.index(1)
    assert sum(BUSY[k] for k in used[:first_one]) <= gov.max_wait_s + BUSY[2]  # not 20 slow steps
    assert used[first_one:].count(1) >= len(used[first_one:]) - 1


def test_more_cores_form_a_halving_ladder_and_one_core_does_nothing():
    assert ThreadGovernor(8).ladder == [8, 4, 2, 1]
    gov = ThreadGovernor(1)
    assert not gov.active
    assert simulate(gov, [(50, {1: 1.0})]) == [1] * 50


def test_short_steps_keep_one_count():
    """Steps under min_step_s (tests, tiny images) never change the count, even when they jump."""
    torch.set_num_threads(2)
    gov = ThreadGovernor(2)
    jumpy = [0.001, 0.02, 0.001, 0.03, 0.002] * 40
    for t in jumpy:
        gov.observe(t)
    assert gov.history == [] and torch.get_num_threads() == 2


def test_training_reports_threads_and_restores_the_count():
    import numpy as np

    import napari_hdn
    from napari_hdn.engine import GaussianNoiseModel

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    noisy = rng.normal(50, 20, (2, 32, 32)).astype(np.float32)
    seen = []
    opts = dict(levels=2, z_dim=2, filters=8, blocks=1, patch_size=32, batch_size=4, bn_chunk=4,
                device="cpu", max_steps=3, val_fraction=0)
    napari_hdn.train(noisy, GaussianNoiseModel(20.0), **opts, threads=1,
                     callbacks=lambda e: e.kind == "step" and seen.append(e.metrics["threads"]))
    assert seen == [1, 1, 1] and torch.get_num_threads() == 2
