"""Data-parallel training over several processes (GPUs, or CPU processes with gloo).

Launch with torch's own launcher, one process per GPU::

    torchrun --nproc-per-node 4 -m napari_hdn.cli train noisy.tif --gaussian-sigma 10 --out m.hdn

(``napari-hdn train --ddp 4 ...`` runs that command). :class:`DDPTrainer` is the
:class:`~napari_hdn.engine.training.trainer.Trainer` with these differences:

* the global batch (``batch_size``) is split evenly over the ranks; each rank draws its own
  patches (its own generator, seeded from the seed and the rank) and processes them in BatchNorm
  chunks of ``bn_chunk`` as one process would: BatchNorm statistics stay per chunk of 8 patches,
  which is why no SyncBatchNorm is needed (the batch must split into whole chunks per rank);
* the loss runs through torch's ``DistributedDataParallel`` (wrapping a small module whose forward
  is ``model.loss``; the ladder inside keeps its parameter names, so model files are unchanged):
  the micro-batches of a step accumulate their gradients locally (``no_sync``) and the last one's
  backward pass averages them over the ranks, overlapping communication with the backward
  computation. A rank whose loss is not finite still takes part (its NaN gradient makes the
  averaged one NaN on every rank), and one small ``all_reduce`` carries the losses for the
  progress reports and a "non-finite" vote, so every rank skips a bad batch together. All ranks
  therefore step with the same gradient and hold identical weights. DDP's per-forward broadcast of
  buffers is off: BatchNorm running statistics are averaged over the ranks at each epoch end;
* rank 0 alone validates (the loss is broadcast, so the schedule and early stopping agree) and
  writes checkpoints, which hold every rank's random state: a resumed run with the same number of
  processes continues exactly;
* stop requests and the time budget are decided together (:meth:`Trainer._agree`);
* a rank that dies makes the others fail in their next collective (gloo/NCCL report the closed
  connection; ``timeout_s`` bounds a hang): they raise :class:`DistributedRunError` naming the last
  checkpoint, which is intact because checkpoints are written atomically.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import HDNError, InputError
from .trainer import Trainer

#: seconds a collective waits for the other ranks before the run is declared dead
DEFAULT_TIMEOUT_S = 600


#: what gloo and NCCL say when a peer process is gone
_PEER_LOST = ("Connection closed", "Connection reset", "connection", "Broken pipe", "gloo", "NCCL",
              "timed out", "Timed out")


class DistributedRunError(HDNError):
    """A process of a multi-process training run died or stopped answering; the run ended."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process: from torch.distributed when initialised, else from the
    environment torchrun sets (RANK, WORLD_SIZE), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def init_process_group(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group torchrun described in the environment (NCCL for CUDA, else gloo);
    each rank uses the GPU of its LOCAL_RANK."""
    if dist.is_initialized():
        return
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed: multi-process training is "
                         "not possible with it")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def _rank_seed(seed: int | None, rank: int, step: int = 0) -> int:
    base = 0 if seed is None else int(seed)
    return (base * 1_000_003 + 7919 * rank + 104_729 * step) % (2**63 - 1)


_NO_FORWARD_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers"
                           in inspect.signature(DistributedDataParallel.__init__).parameters
                           else "broadcast_buffers")


class _Loss(torch.nn.Module):
    """``model.loss`` as a module's forward, for DistributedDataParallel (which hooks forward).
    Holds the ladder as its only submodule: the parameters DDP averages are the ladder's."""

    def __init__(self, model):
        super().__init__()
        self.ladder = model.ladder
        self._model = [model]  # not a submodule: the model is not an nn.Module

    def forward(self, x: torch.Tensor):
        return self._model[0].loss(x)


class DDPTrainer(Trainer):
    """:class:`Trainer` for one rank of a data-parallel run (see the module docstring). Takes the
    Trainer's arguments; the process group must be initialised (:func:`init_process_group`)."""

    def __init__(self, *args, **kwargs):
        if not dist.is_initialized():
            raise InputError("DDPTrainer needs torch.distributed initialised: launch with torchrun "
                             "(or call napari_hdn.engine.training.ddp.init_process_group)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        super().__init__(*args, **kwargs)
        cfg = self.tcfg
        if self.device.type == "cuda" and self.world > 1:
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            if self.device.index is None or self.device.index != local:
                self.device = torch.device("cuda", local)
                self.model.to(self.device)
        if cfg.batch_size % self.world:
            raise InputError(f"the batch size {cfg.batch_size} does not split evenly over "
                             f"{self.world} processes: use a multiple of {self.world}")
        self.local_batch = cfg.batch_size // self.world
        if self.local_batch % cfg.bn_chunk and self.local_batch > cfg.bn_chunk:
            raise InputError(
                f"each of the {self.world} processes gets {self.local_batch} patches, not whole "
                f"BatchNorm chunks of {cfg.bn_chunk}: use a batch size that is a multiple of "
                f"{self.world * cfg.bn_chunk}")
        saved_world = self._resume_tensors.get("ddp.world_size")
        resumed = saved_world is not None and int(saved_world[0]) == self.world
        if resumed:
            self.gen.set_state(self._resume_tensors[f"rng.patches.rank{self.rank}"])
            torch.set_rng_state(self._resume_tensors[f"rng.torch.rank{self.rank}"])
        else:  # each rank its own patches and latent noise, different from every other rank's
            self.gen.manual_seed(_rank_seed(cfg.seed, self.rank, self.step))
            torch.manual_seed(_rank_seed(cfg.seed, self.rank, self.step) + 1)
        self._resume_tensors = {}
        self.last_checkpoint: Path | None = None
        gpu = None
        if self.device.type == "cuda":
            gpu = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        self.ddp = DistributedDataParallel(
            _Loss(self.model), device_ids=gpu,
            # no buffer broadcast before each forward: per-chunk BatchNorm statistics, averaged at
            # epoch ends (newer torch names the option forward_sync_buffers)
            **{_NO_FORWARD_BUFFER_SYNC: False},
            # levels withheld from the image leave their inference weights without a gradient
            find_unused_parameters=bool(self.model.config.deactivated_levels))
        # (DDP's constructor also broadcast rank 0's weights and buffers: every rank starts equal)

    # -- what all ranks share ------------------------------------------------------------------
    def _agree(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _patches_per_step(self) -> int:
        """This rank's share of the global batch."""
        return self.local_batch

    def train_step(self):
        """One optimiser step on the global batch: this rank's micro-batches through DDP (the
        last one's backward pass averages the gradients over the ranks), then one small
        ``all_reduce`` of the losses and a non-finite vote."""
        x = self._next_batch()
        self._warmup_lr()
        self.optimizer.zero_grad(set_to_none=True)
        n = x.shape[0]
        parts = x.split(self._micro_batch())
        levels = self.model.config.levels
        stats = torch.zeros(3 + levels, dtype=torch.float64)  # loss, recon, non-finite, kl
        for i, xb in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                loss, recon, kl = self.ddp(xb)
                w = xb.shape[0] / n
                # a non-finite loss still goes backward (every rank must join the gradient
                # averaging); its NaN gradient reaches every rank, which all skip the step
                (loss * w).backward()
            if not torch.isfinite(loss):
                stats[2] = 1.0
            else:
                stats[0] += float(loss.detach()) * w
                stats[1] += float(recon) * w
                stats[3:] += kl.detach().double().cpu() * w
        t = stats.to(self._comm_device(), torch.float32)
        dist.all_reduce(t)
        t = t.double().cpu() / self.world
        if t[2] > 0:  # some rank had a non-finite loss: every rank skips this batch
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if not self._apply_gradients():
            return None
        return float(t[0]), float(t[1]), t[3:].tolist()

    def _average_buffers(self) -> None:
        """BatchNorm running statistics (and the weight average) as the mean over the ranks."""
        tensors = [b for b in self.model.ladder.buffers() if b.is_floating_point()]
        if self.ema is not None:
            tensors += [v for v in self.ema.values() if v.is_floating_point()]
        for t in tensors:
            dist.all_reduce(t)
            t /= self.world

    def validate(self):
        """Rank 0 validates; every rank receives its numbers."""
        levels = self.model.config.levels
        if self.rank == 0:
            loss, kl = super().validate()
            kl = (list(kl) + [0.0] * levels)[:levels]
            t = torch.tensor([loss, *kl], dtype=torch.float64)
        else:
            t = torch.zeros(levels + 1, dtype=torch.float64)
        t = t.to(self._comm_device())
        dist.broadcast(t, 0)
        t = t.cpu()
        return float(t[0]), t[1:].tolist()

    def _end_epoch(self, train_loss: float, validate: bool = True) -> bool:
        self._average_buffers()
        return super()._end_epoch(train_loss, validate)

    # -- checkpoints: every rank's random state, written by rank 0 -----------------------------
    def _save_checkpoint(self, name: str, state=None):
        gathered = {}  # a collective: every rank takes part, rank 0 writes
        for key, st in (("patches", self.gen.get_state()), ("torch", torch.get_rng_state())):
            parts = [torch.empty_like(st) for _ in range(self.world)]
            dist.all_gather(parts, st)
            gathered.update({f"rng.{key}.rank{r}": g for r, g in enumerate(parts)})
        gathered["ddp.world_size"] = torch.tensor([self.world], dtype=torch.int64)
        self._gathered = gathered
        if self.rank != 0:
            return None
        path = super()._save_checkpoint(name, state)
        if name == "last":
            self.last_checkpoint = path
        return path

    def _checkpoint_extra(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self._gathered)

    def run(self):
        try:
            return super().run()
        except RuntimeError as exc:
            text = str(exc)
            if not (isinstance(exc, dist.DistBackendError)
                    or any(w in text for w in _PEER_LOST)):
                raise
            ck = self.checkpoint_dir / "last.hdn" if self.checkpoint_dir else None
            kept = (f"the last checkpoint {ck} is intact: continue with --resume {ck}"
                    if ck is not None and ck.exists() else "no checkpoint had been written yet")
            raise DistributedRunError(
                f"rank {self.rank}: another process of this {self.world}-process training run "
                f"died or stopped answering ({str(exc).splitlines()[0][:200]}); the run ended; "
                f"{kept}") from None


def train_ddp(images, noise_model=None, *, model_config=None, training_config=None, **kwargs):
    """:func:`napari_hdn.engine.train` for one rank of a torchrun launch: joins the process group
    torchrun describes, trains with :class:`DDPTrainer`, returns the model on every rank."""
    from ..config import ModelConfig, TrainingConfig, validated
    from ..device import resolve_device
    from .run import _split_overrides

    trainer_kw = {k: kwargs.pop(k) for k in ("axes", "checkpoint_dir", "callbacks", "resume",
                                             "stop_flag") if k in kwargs}
    m_over, t_over = _split_overrides(kwargs)
    if m_over:
        model_config = validated(ModelConfig, {**(model_config or ModelConfig()).model_dump(),
                                               **m_over})
    device = (training_config or TrainingConfig(**t_over)).device
    init_process_group(resolve_device(device))
    trainer = DDPTrainer(images, noise_model, model_config=model_config,
                         training_config=training_config, training_overrides=t_over, **trainer_kw)
    return trainer.run()
