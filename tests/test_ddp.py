"""Data-parallel training on CPU: 2 processes (gloo) launched by torchrun, a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_hdn.engine import GaussianNoiseModel, train
from napari_hdn.engine.network.model import read_model_file

HERE = Path(__file__).parent
SRC = HERE.parent / "src"


def torchrun(out: Path, steps: int, resume=None, die_at: int = 0, same_draws: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(HERE)]),
               HDN_TEST_DIE_AT_STEP=str(die_at), OMP_NUM_THREADS="1",
               HDN_TEST_SAME_DRAWS="1" if same_draws else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "_ddp_job.py"), str(out), str(steps)] + ([str(resume)] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_two_ranks_train_like_one_process_resume_and_survive_a_dead_rank(tmp_path):
    from _ddp_job import data, settings

    # 1. two ranks x 8 patches: identical weights on both ranks (BatchNorm statistics included)
    run = torchrun(tmp_path / "a", 10)
    assert run.returncode == 0, run.stderr[-2000:]
    r0, r1 = (np.load(tmp_path / "a" / f"rank{r}.npz") for r in (0, 1))
    assert sorted(r0.files) == sorted(r1.files)
    for k in r0.files:
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
    ddp = json.loads((tmp_path / "a" / "rank0.json").read_text())["losses"]
    assert len(ddp) == 10
    # 1b. exactly: when both ranks draw the same 8 patches and latent noise, the averaged gradient
    # is one rank's, so 10 steps at a global batch of 16 give the weights (and losses) of one
    # process at a batch of 8 with those draws. Pins DDP's averaging (a sum, or a gradient
    # counted twice, would differ) and the BatchNorm buffer averaging.
    run = torchrun(tmp_path / "same", 10, same_draws=True)
    assert run.returncode == 0, run.stderr[-2000:]
    two = np.load(tmp_path / "same" / "rank0.npz")
    alone, alone_losses = _one_rank_run(tmp_path, 10, batch_size=8)
    assert sorted(two.files) == sorted(alone)
    for k in two.files:
        np.testing.assert_allclose(two[k], alone[k], rtol=1e-5, atol=1e-6, err_msg=k)
    same_losses = json.loads((tmp_path / "same" / "rank0.json").read_text())["losses"]
    np.testing.assert_allclose(same_losses, alone_losses, rtol=1e-5)
    # 2. the loss matches one process at the same global batch (16 patches, BatchNorm chunks of 8).
    # The two runs draw different patches and latent noise (the ranks draw their own), so their
    # losses are two noisy estimates of the same curve: the step-to-step noise s of the one-process
    # run (from successive differences, which removes the trend) bounds the difference of the
    # 10-step means, whose standard error is s * sqrt(2 / 10); 4 of those is the tolerance.
    torch.set_num_threads(1)
    one: list[float] = []
    train(data(), GaussianNoiseModel(10.0), axes="SYX", **settings(10),
          callbacks=lambda ev: ev.kind == "step" and one.append(ev.metrics["train_loss"]))
    s = np.std(np.diff(one)) / np.sqrt(2)
    tol = 4 * s * np.sqrt(2 / 10)
    assert abs(np.mean(ddp) - np.mean(one)) < tol, (np.mean(ddp), np.mean(one), tol)
    assert tol < 0.1 * np.mean(one)  # and the tolerance is a few percent of the loss, not more
    # 3. rank 0 alone wrote the checkpoints; resume from them (to 20 steps) while rank 1 is killed
    # (SIGKILL) at step 17: torchrun ends the run, and the checkpoint of step 15 is intact
    last = tmp_path / "a" / "ck" / "last.hdn"
    assert read_model_file(last)[1]["checkpoint"]["step"] == 10
    run = torchrun(tmp_path / "b", 20, resume=last, die_at=17)
    assert run.returncode != 0
    assert "SIGKILL" in run.stderr and "rank      : 1" in run.stderr
    model, meta, tensors = read_model_file(tmp_path / "b" / "ck" / "last.hdn")
    assert meta["checkpoint"]["step"] == 15
    assert int(tensors["ddp.world_size"][0]) == 2 and "rng.patches.rank1" in tensors
    assert np.isfinite(model.predict(data()[0], n_samples=2).mmse).all()


def _one_rank_run(tmp_path: Path, steps: int, **kw):
    """The data-parallel trainer in this process as a world of one (gloo), drawing what rank 0
    draws (``same_draws_on_every_rank``): (final weights, per-step losses)."""
    import torch.distributed as dist
    from _ddp_job import data, same_draws_on_every_rank, settings

    import napari_hdn.engine.training.ddp as ddp_module

    seed_of = ddp_module._rank_seed
    same_draws_on_every_rank()
    losses: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=(tmp_path / "pg").as_uri(), rank=0, world_size=1)
    try:
        model = ddp_module.train_ddp(
            data(), GaussianNoiseModel(10.0), axes="SYX", **settings(steps, **kw),
            callbacks=lambda ev: ev.kind == "step" and losses.append(ev.metrics["train_loss"]))
    finally:
        dist.destroy_process_group()
        ddp_module._rank_seed = seed_of
        torch.set_num_threads(threads)
    return {k: v.numpy() for k, v in model.ladder.state_dict().items()}, losses
