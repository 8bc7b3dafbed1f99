"""One rank of the DDP test (run by torchrun from tests/test_ddp.py): train a tiny model and
save each rank's final weights and per-step losses."""

import json
import os
import signal
import sys

import numpy as np
import torch
from _helpers import TINY, smooth_image

from napari_hdn.engine import GaussianNoiseModel, ModelConfig, TrainingConfig
from napari_hdn.engine.training.ddp import train_ddp, world


def data():
    rng = np.random.default_rng(0)
    img = np.stack([smooth_image((64, 64), k) for k in range(4)])
    return (img + rng.normal(0, 10, img.shape)).astype(np.float32)


def settings(steps: int, **kw):
    return dict(model_config=ModelConfig(**TINY),
                training_config=TrainingConfig(**{
                    **dict(patch_size=32, batch_size=16, bn_chunk=8, max_steps=steps,
                           steps_per_epoch=5, val_fraction=0.25, lr=1e-3, seed=0, threads=1,
                           device="cpu"), **kw}))


def same_draws_on_every_rank():
    """Make every rank draw rank 0's patches and latent noise (the test's exact comparison)."""
    import napari_hdn.engine.training.ddp as ddp

    seed_of = ddp._rank_seed
    ddp._rank_seed = lambda seed, rank, step=0: seed_of(seed, 0, step)


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    losses = []
    die_at = int(os.environ.get("HDN_TEST_DIE_AT_STEP", 0))  # rank 1 is killed at that step
    if os.environ.get("HDN_TEST_SAME_DRAWS"):
        same_draws_on_every_rank()

    def on_event(ev):
        if ev.kind == "step":
            losses.append(ev.metrics["train_loss"])
            if ev.step == die_at and world()[0] == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    kw = settings(steps)
    if resume:  # the checkpoint's settings, with more steps
        kw = {"model_config": None, "max_steps": steps}
    model = train_ddp(data(), GaussianNoiseModel(10.0), axes="SYX", checkpoint_dir=f"{out}/ck",
                      resume=resume, **kw,
                      callbacks=on_event)
    rank, _ = world()
    state = {k: v.numpy() for k, v in model.ladder.state_dict().items()}
    np.savez(f"{out}/rank{rank}.npz", **state)
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump({"losses": losses, "steps": model.info["steps"]}, fh)
