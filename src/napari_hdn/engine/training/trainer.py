"""Training loop: Adamax, ReduceLROnPlateau, early stopping, NaN guard, events, stop, checkpoints.

Checkpoints are ordinary model files (``best.hdn``, ``last.hdn``) with the optimiser, scheduler and
RNG state added, so a checkpoint can be used for prediction as it is and training can resume from it.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, TrainingConfig
from ..data.arrays import (
    Normalisation,
    PatchSampler,
    augment_batch,
    grid_patches,
    split_train_val,
    training_frames,
)
from ..data.frames import frame_statistics, sample_pixels
from ..device import resolve_device
from ..errors import (
    HDNWarning,
    InputError,
    ModelFileError,
    SuspiciousNoiseModelWarning,
    TrainingDivergedError,
)
from ..events import Callback, EventKind, EventTask, Reporter, StopFlag
from ..heap import keep_heap
from ..network.model import HDNModel, read_model_file
from ..noise.base import NoiseModel, NoiseModelRangeWarning
from ..noise.diagnostics import check_noise_model, verdict_warning
from ..threads import BusyMonitor, ThreadGovernor
from .checkpoints import (
    _optimizer_state_from_file,
    _optimizer_state_to_file,
    _same_data,
    _warn_other_data,
    check_steps_left,
    data_fingerprint,
    resumed_training_config,
)
from .priors import initial_weights

# patch-channels (patches x filters) per CPU pass: the fastest, leanest pass size measured (see
# docs/lab-notes.md)
CPU_MICRO_BATCH_CHANNELS = 512


def _noise_state(nm) -> tuple:
    """A comparable summary of a noise model: kind, parameters and tensors."""
    if not isinstance(nm, NoiseModel):
        return (type(nm).__name__,)
    params, tensors = nm.get_state()
    return (nm.kind, repr(sorted(params.items())),
            tuple((k, tuple(v.shape), float(v.double().sum())) for k, v in sorted(tensors.items())))


def _check_shot_noise(nm, frames) -> None:
    """Warn when a Poisson-Gaussian model meets data (almost) all at or below its offset: the shot
    noise it models is then zero everywhere, which is rarely what the camera did."""
    if getattr(nm, "kind", "") != "poisson-gaussian":
        return
    vals = sample_pixels(frames, 100_000)
    hi = float(np.percentile(vals, 99))
    if hi <= nm.offset:
        warnings.warn(
            f"99% of the data are at or below the Poisson-Gaussian offset {nm.offset:g} (99th "
            f"percentile {hi:.4g}): the model sees no shot noise there; check the offset (the "
            "camera's dark level) and that the data are raw counts, not background-subtracted",
            HDNWarning, stacklevel=4,
        )


class Trainer:
    """Trains an HDN on noisy images; use :func:`train` for the one-call version.

    Parameters
    ----------
    images : array or list of arrays
        Noisy training data: YX, SYX/TYX (frames), ZYX (slice-wise) or a list of 2D images.
    noise_model : NoiseModel
        Pixel noise model in the units of ``images``. Ignored when resuming (the checkpoint's is
        used).
    axes : str, optional
        Axes of ``images`` (e.g. ``"TYX"``); settles ambiguous 3D input.
    model_config, training_config : configs (defaults: the paper's).
    checkpoint_dir : path, optional
        Where ``best.hdn`` and ``last.hdn`` are written (atomically) after each validation.
    callbacks : callable or list, optional
        Receive :class:`ProgressEvent` s: ``"step"`` every step, ``"epoch"`` after each validation.
    resume : path, optional
        A checkpoint (or model) file to continue from: weights, optimiser, schedule, step count.
        Its training settings are reused unless ``training_config`` is given.
    training_overrides : dict, optional
        Individual :class:`TrainingConfig` fields applied on top (e.g. a larger ``max_steps``).
    stop_flag : StopFlag, optional
        Set it from any thread to stop within one step; the best model so far is returned.
    initial_model : HDNModel, optional
        Start from this model's weights, noise model and normalisation (a fresh optimiser and
        schedule) instead of a new network: fine-tuning, see :func:`fine_tune`. Its architecture
        is used (``model_config`` must be left out); the model itself is not changed.
    """

    def __init__(
        self,
        images,
        noise_model: NoiseModel | None,
        *,
        axes: str | None = None,
        model_config: ModelConfig | None = None,
        training_config: TrainingConfig | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        callbacks: Callback | list[Callback] | None = None,
        resume: str | os.PathLike | None = None,
        stop_flag: StopFlag | None = None,
        training_overrides: dict | None = None,
        initial_model: HDNModel | None = None,
    ):
        if initial_model is not None and (resume is not None or model_config is not None):
            raise InputError("fine-tuning starts from initial_model: leave resume and model_config "
                             "out (the initial model's architecture is used)")
        resumed = read_model_file(resume) if resume is not None else None
        ck = resumed[1].get("checkpoint", {}) if resumed is not None else {}
        ck = ck if isinstance(ck, dict) else {}
        settings = ck
        if resumed is not None and not ck:  # a finished model file, not a checkpoint
            which = ("the settings given" if training_config is not None else
                     "the settings it was trained with")
            warnings.warn(
                f"{resume} holds no checkpoint state (optimiser, schedule, step): training goes on "
                f"from its weights with a fresh optimiser and {which}; resume from its checkpoint "
                "folder's last.hdn to continue that run as it was", HDNWarning, stacklevel=2)
            saved = (resumed[0].info or {}).get("training_config")
            settings = {"training_config": saved} if isinstance(saved, dict) else {}
        self.tcfg = resumed_training_config(settings, training_config, training_overrides, resume)
        if resumed is not None:  # before the data are read: a run that would train nothing
            over = training_overrides or {}
            check_steps_left(ck, self.tcfg, resume,
                             steps_given=training_config is not None or "max_steps" in over,
                             budget_given=training_config is not None or "time_budget_s" in over)
        self.stop_flag = stop_flag or StopFlag()
        self.report = Reporter(EventTask.TRAIN, callbacks)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = resolve_device(self.tcfg.device)
        frames = training_frames(images, axes, name="training images")
        # one pass over the data (a frame at a time): the values checked, the statistics kept
        self.data_stats = frame_statistics(frames, "the training images")
        self.data = data_fingerprint(frames, self.data_stats)  # recorded, compared on resume
        p = self.tcfg.patch_size
        self.train_frames, self.val_frames, self.split_note = split_train_val(
            frames, self.tcfg.val_fraction, p
        )
        self._resume_meta: dict = {}
        self._resume_tensors: dict = {}
        if self.tcfg.seed is not None:
            torch.manual_seed(self.tcfg.seed)
        if resumed is not None:
            model, meta, tensors = resumed
            self._resume_meta, self._resume_tensors = meta.get("checkpoint", {}), tensors
            if model_config is not None and model_config != model.config:
                raise InputError(
                    "the architecture options differ from the checkpoint being resumed; leave them "
                    "out when resuming (the checkpoint's architecture is used)"
                )
            if noise_model is not None and _noise_state(noise_model) != _noise_state(model.noise_model):
                raise InputError(
                    f"a resumed run keeps the noise model it was trained with "
                    f"({model.noise_model!r}); leave the noise model out when resuming, or start a "
                    f"new run to train with {noise_model!r}"
                )
            then = model.info.get("training_data")
            if self._resume_meta and isinstance(then, dict) and not _same_data(then, self.data):
                _warn_other_data(resume, then, self.data)
            self.model = model
        elif initial_model is not None:
            self.model = HDNModel(initial_model.config, copy.deepcopy(initial_model.noise_model),
                                  initial_model.normalisation,
                                  copy.deepcopy(initial_model.ladder).train(),
                                  dict(initial_model.info))
        else:
            if type(noise_model).__name__ == "ChannelNoiseModels":
                raise InputError(
                    f"one noise model per channel ({len(noise_model)}) was given for images of "
                    "one channel: give the images with their channel axis (axes with C) to "
                    "train a model per channel, or one channel's noise model")
            if not isinstance(noise_model, NoiseModel):
                raise InputError(
                    "a noise model is required: pass e.g. GaussianNoiseModel(sigma) or a fitted "
                    "noise model (napari_hdn.load_noise_model(path))"
                )
            mcfg = model_config or ModelConfig()
            if not self.data_stats[1] > 0:
                raise InputError("the training images are constant (zero variance): there is "
                                 "nothing to denoise")
            norm = Normalisation(*self.data_stats)
            self.model = HDNModel(mcfg, noise_model, norm)
            # the start: only weights are taken; the noise model and normalisation are this data's
            weights, record = initial_weights(self.tcfg.init, mcfg)
            if weights is not None:
                self.model.ladder.load_state_dict(weights, strict=True)
            self.model.info["start"] = record
        # a noise model whose numbers give NaN or infinity fails at the first step: said now
        mean, std = self.data_stats
        check_noise_model(self.model.noise_model, (mean - 4 * std, mean + 4 * std))
        self.noise_range = self.model.noise_model.range_report(frames)
        if self.noise_range["level"] != "ok":
            self.model.info["noise_range"] = self.noise_range
        if self.noise_range["level"] == "warning":
            warnings.warn(self.noise_range["message"], NoiseModelRangeWarning, stacklevel=3)
        _check_shot_noise(self.model.noise_model, frames)
        self.noise_warning = verdict_warning(self.model.noise_model)
        if self.noise_warning:
            warnings.warn(self.noise_warning, SuspiciousNoiseModelWarning, stacklevel=3)
        self.model.to(self.device)
        self.model.ladder.set_bn_chunk(self.tcfg.bn_chunk)
        self.gen = torch.Generator()
        self.gen.manual_seed(self.tcfg.seed if self.tcfg.seed is not None else int(time.time_ns()))
        norm = self.model.normalisation
        self.sampler = PatchSampler(self.train_frames, p, self.gen, transform=norm.forward)
        self.val_batch = (
            grid_patches(self.val_frames, p, self.tcfg.val_patches, transform=norm.forward)
            if self.val_frames
            else None
        )
        self.steps_per_epoch = self.tcfg.steps_per_epoch or 100
        self.optimizer = torch.optim.Adamax(self.model.ladder.parameters(), lr=self.tcfg.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=self.tcfg.lr_factor, patience=self.tcfg.lr_patience
        )
        self.step = 0
        self.epoch = 0
        self.best_loss = math.inf
        self.best_state: dict | None = None
        self.epochs_since_best = 0
        self.history: list[dict] = []
        # weight average (parameters and BatchNorm statistics), see TrainingConfig.ema_decay
        self.ema: dict[str, torch.Tensor] | None = (
            self._live_state() if self.tcfg.ema_decay is not None else None
        )
        self.train_seconds = 0.0  # training time so far (resumed runs continue the count)
        if resume is not None:
            self._restore(resume)

    # -- checkpoint state ----------------------------------------------------------------------
    def _restore(self, path) -> None:
        ck = self._resume_meta
        if not ck:
            return  # a plain model file: fine-tune with a fresh optimiser
        try:
            self.optimizer.load_state_dict(
                _optimizer_state_from_file(ck["optimizer"], self._resume_tensors)
            )
            self.scheduler.load_state_dict(ck["scheduler"])
            self.step, self.epoch = int(ck["step"]), int(ck["epoch"])
            self.best_loss = float(ck["best_loss"])
            self.epochs_since_best = int(ck["epochs_since_best"])
            self.history = list(ck.get("history", []))
            if "rng.patches" in self._resume_tensors:
                self.gen.set_state(self._resume_tensors["rng.patches"])
            if "rng.torch" in self._resume_tensors:
                torch.set_rng_state(self._resume_tensors["rng.torch"])
            self.train_seconds = float(ck.get("train_seconds", 0.0))
            if self.ema is not None:
                saved = {k[4:]: v for k, v in self._resume_tensors.items() if k.startswith("ema.")}
                if set(saved) == set(self.ema):
                    self.ema = {k: v.to(self.device).clone() for k, v in saved.items()}
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{path}: the checkpoint's training state is unusable ({exc})") from None
        best = {k[5:]: v for k, v in self._resume_tensors.items() if k.startswith("best.")}
        self.best_state = best or None

    def _save_checkpoint(self, name: str, state: dict | None = None) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        opt_tensors, opt_meta = _optimizer_state_to_file(self.optimizer)
        extra = dict(opt_tensors)
        extra["rng.patches"] = self.gen.get_state()
        extra["rng.torch"] = torch.get_rng_state()
        extra.update(self._checkpoint_extra(name))
        if self.best_state is not None and name == "last":
            extra.update({f"best.{k}": v for k, v in self.best_state.items()})
        if self.ema is not None and name == "last":
            extra.update({f"ema.{k}": v for k, v in self.ema.items()})
        ck = {
            "step": self.step,
            "epoch": self.epoch,
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else 1e30,
            "epochs_since_best": self.epochs_since_best,
            "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict(),
            "training_config": self.tcfg.model_dump(),
            "history": self.history[-1000:],
            "train_seconds": self.train_seconds,
        }
        model = self.model
        if state is not None:  # write the best weights without disturbing the live model
            model = copy.copy(self.model)
            model.ladder = copy.deepcopy(self.model.ladder)
            model.ladder.load_state_dict(state)
        self._update_info()
        return model.save(self.checkpoint_dir / f"{name}.hdn", extra, {"checkpoint": ck})

    def _checkpoint_extra(self, name: str) -> dict[str, torch.Tensor]:
        """Hook: more tensors for checkpoint ``name`` (multi-process training adds each
        process's random state, see :mod:`.ddp`)."""
        return {}

    def _agree(self, flag: bool) -> bool:
        """Hook: a decision every process of a run takes together (stop, time budget); one
        process decides alone. Multi-process training (:mod:`.ddp`) returns True on all processes
        when any says True, so that none waits for the others in a collective."""
        return flag

    def _update_info(self) -> None:
        self.model.info.update(
            {
                "steps": self.step,
                "epochs": self.epoch,
                "best_val_loss": self.best_loss if math.isfinite(self.best_loss) else None,
                "validation": self.split_note,
                "training_seconds": self.train_seconds,
                "training_config": self.tcfg.model_dump(),
                "training_data": self.data,
                "torch_version": torch.__version__,
            }
        )

    # -- loop ----------------------------------------------------------------------------------
    # -- weights -------------------------------------------------------------------------------
    def _live_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.ladder.state_dict().items()}

    def _update_ema(self) -> None:
        """ema <- d * ema + (1 - d) * live, with a smaller d early on (the average would otherwise
        carry the random initialisation for ~1 / (1 - d) steps)."""
        d = min(self.tcfg.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        live = self.model.ladder.state_dict()
        floats = [k for k, v in self.ema.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.ema[k] for k in floats], [live[k].detach() for k in floats], 1.0 - d)
        for k, v in self.ema.items():
            if not v.is_floating_point():
                v.copy_(live[k])

    def current_state(self) -> dict[str, torch.Tensor]:
        """The weights the model is evaluated with: the average when ``ema_decay`` is set."""
        return {k: v.clone() for k, v in self.ema.items()} if self.ema is not None else self._live_state()

    def snapshot(self) -> HDNModel:
        """A copy of the model with the weights the trainer would return if stopped now
        (see :meth:`run`): the current ones, unless validation data say an earlier state was better.
        The trainer's state is not changed."""
        state = self.current_state()
        if self.val_batch is not None and self.best_state is not None:
            if not self.validate()[0] < self.best_loss:
                state = self.best_state
        model = copy.copy(self.model)
        model.info = dict(self.model.info)
        model.ladder = copy.deepcopy(self.model.ladder)
        model.ladder.load_state_dict(state)
        model.ladder.eval()
        return model

    @torch.no_grad()
    def validate(self) -> tuple[float, list[float]]:
        """Validation loss (fixed patches, fixed latent noise) in eval mode, with the weights the
        trainer returns (the average when ``ema_decay`` is set)."""
        batch = self.val_batch
        ladder = self.model.ladder
        was_training = ladder.training
        live = None
        if self.ema is not None:
            live = self._live_state()
            ladder.load_state_dict(self.ema)
        ladder.eval()
        g = torch.Generator(device=self.device)
        g.manual_seed(12345)
        fork_devices = [self.device] if self.device.type == "cuda" else []
        total, kls, n = 0.0, None, 0
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(12345)
            for i in range(0, batch.shape[0], self.tcfg.batch_size):
                xb = batch[i : i + self.tcfg.batch_size].to(self.device)
                loss, _, kl = self.model.loss(xb)
                total += float(loss) * xb.shape[0]
                kls = kl * xb.shape[0] if kls is None else kls + kl * xb.shape[0]
                n += xb.shape[0]
        if live is not None:
            ladder.load_state_dict(live)
        ladder.train(was_training)
        return total / n, (kls / n).tolist()

    def _patches_per_step(self) -> int:
        """Patches this process draws per step (a share of the batch when several train)."""
        return self.tcfg.batch_size

    def _next_batch(self) -> torch.Tensor:
        x = self.sampler.sample(self._patches_per_step())
        if self.tcfg.augment:
            x = augment_batch(x, self.gen)
        return x.to(self.device, non_blocking=True)

    def _micro_batch(self) -> int:
        mb = self.tcfg.micro_batch
        if mb is None:  # CPU: cache-friendly passes (measured, see the config); GPU: one wide pass
            c = self.tcfg.bn_chunk  # whole BatchNorm chunks per pass
            per_pass = CPU_MICRO_BATCH_CHANNELS // self.model.config.filters
            mb = c * max(1, per_pass // c) if self.device.type == "cpu" else self.tcfg.batch_size
        return max(1, min(mb, self.tcfg.batch_size))

    def train_step(self) -> tuple[float, float, list[float]] | None:
        """One optimiser step; None when the batch was skipped for a non-finite loss.

        The batch is processed in micro-batches whose gradients are accumulated (same gradient as
        one pass: BatchNorm statistics are per chunk either way).
        """
        x = self._next_batch()
        self._warmup_lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss, recon, kl, finite = self._accumulate(x)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if not self._apply_gradients():
            return None
        return loss, recon, kl.tolist()

    def _accumulate(self, x: torch.Tensor):
        """Forward and backward over the micro-batches of ``x``, gradients accumulated.

        Returns ``(loss, recon, kl per level, finite)``, the sums weighted by micro-batch size;
        at the first non-finite loss it stops and returns what it has with ``finite`` False.
        """
        n = x.shape[0]
        loss_sum, recon_sum, kl_sum = 0.0, 0.0, None
        for xb in x.split(self._micro_batch()):
            loss, recon, kl = self.model.loss(xb)
            if not torch.isfinite(loss):
                return loss_sum, recon_sum, kl_sum, False
            w = xb.shape[0] / n
            (loss * w).backward()
            loss_sum += float(loss.detach()) * w
            recon_sum += float(recon) * w
            kl_sum = kl * w if kl_sum is None else kl_sum + kl * w
        return loss_sum, recon_sum, kl_sum, True

    def _apply_gradients(self) -> bool:
        """Clip (when configured), step, update the weight average; False when the gradient norm
        is not finite (the step is skipped)."""
        if self.tcfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.ladder.parameters(), self.tcfg.grad_clip)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return False
        self.optimizer.step()
        if self.ema is not None:
            self._update_ema()
        return True

    def _warmup_lr(self) -> None:
        """Set the rate of the coming step: a linear warm-up to the peak over ``warmup_steps``;
        afterwards the plateau scheduler owns the rate."""
        cfg = self.tcfg
        w = cfg.warmup_steps
        if self.step < w:
            lr = cfg.lr * (self.step + 1) / (w + 1)
        elif self.step == w and w > 0:
            lr = cfg.lr
        else:
            return
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def run(self) -> HDNModel:
        """Train until max_steps, early stopping or a stop request; return the best model."""
        cfg = self.tcfg
        ladder = self.model.ladder
        ladder.train()
        threads_before = torch.get_num_threads()
        governor = None
        if self.device.type == "cpu":
            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            else:
                governor = ThreadGovernor(threads_before)
        try:
            with keep_heap(self.device):
                return self._run(governor)
        finally:
            torch.set_num_threads(threads_before)

    def _run(self, governor: ThreadGovernor | None) -> HDNModel:
        cfg = self.tcfg
        self.report(EventKind.START, step=self.step, total=cfg.max_steps, epoch=self.epoch,
                    metrics={"noise_range": self.noise_range, "time_budget_s": cfg.time_budget_s,
                             "noise_warning": self.noise_warning})
        bad = 0
        stopped = False
        window: list[float] = []
        budget = cfg.time_budget_s
        # (the other processes of a multi-process run are not competition)
        busy = BusyMonitor() if self.device.type == "cpu" and getattr(self, "world", 1) == 1 \
            else None
        t_last = time.perf_counter()
        while self.step < cfg.max_steps:
            if self._agree(self.stop_flag.is_set()):
                stopped = True
                break
            if budget is not None and self._agree(self.train_seconds >= budget):
                break
            threads = torch.get_num_threads() if self.device.type == "cpu" else None
            out = self.train_step()
            now = time.perf_counter()
            self.train_seconds += now - t_last
            if governor is not None:
                governor.observe(now - t_last)
            t_last = now
            if out is None:
                bad += 1
                if bad >= cfg.max_bad_batches:
                    self._save_checkpoint("last")
                    raise TrainingDivergedError(
                        f"the loss was NaN/inf for {bad} batches in a row at step {self.step}; "
                        "training stopped (last checkpoint kept). Try a lower learning rate, "
                        "gradient clipping (grad_clip=1.0) or check the noise model and data."
                    )
                continue
            bad = 0
            self.step += 1
            loss, recon, kl = out
            window.append(loss)
            metrics = {"train_loss": loss, "reconstruction": recon, "kl_per_level": kl,
                       "train_seconds": self.train_seconds, "time_budget_s": budget,
                       "lr": self.optimizer.param_groups[0]["lr"],
                       "threads": threads}  # the count this step ran with
            said = busy.poll() if busy is not None else None
            if said:
                metrics["busy"] = said + (
                    "; with a time budget this run trains fewer steps than it would alone"
                    if budget is not None else "; the steps trained are the same, only later")
            self.report(EventKind.STEP, step=self.step, total=cfg.max_steps, epoch=self.epoch,
                        metrics=metrics)
            out_of_time = budget is not None and self._agree(self.train_seconds >= budget)
            if self.step % self.steps_per_epoch == 0 or self.step == cfg.max_steps or out_of_time:
                if self._end_epoch(float(np.mean(window))):
                    break
                window = []
                t_last = time.perf_counter()  # validation and checkpoints are not training time
        if stopped and window:
            self._end_epoch(float(np.mean(window)), validate=self.val_batch is not None)
        self._finish(stopped)
        return self.model

    def _end_epoch(self, train_loss: float, validate: bool = True) -> bool:
        """Validate, schedule, checkpoint. Returns True when early stopping triggers."""
        self.epoch += 1
        if self.val_batch is not None and validate:
            val_loss, kl = self.validate()
        else:
            val_loss, kl = train_loss, []
        if self.step > self.tcfg.warmup_steps:
            self.scheduler.step(val_loss)
        improved = val_loss < self.best_loss
        if improved:
            self.best_loss = val_loss
            self.epochs_since_best = 0
        else:
            self.epochs_since_best += 1
        kept = improved or self.val_batch is None
        if kept:
            # without validation data the training loss cannot tell over-fitting from noise: the
            # latest weights are kept (it still drives the schedule and early stopping)
            self.best_state = self.current_state()
        rec = {
            "step": self.step,
            "epoch": self.epoch,
            "train_loss": train_loss,
            "val_loss": val_loss if self.val_batch is not None else None,
            "kl_per_level": kl,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_seconds": self.train_seconds,
        }
        self.history.append(rec)
        if kept:  # best.hdn is the model a stop returns: the weights kept (with ema_decay the
            # average, which is what was validated), not the live ones
            self._save_checkpoint("best", self.best_state)
        self._save_checkpoint("last")
        self.report(EventKind.EPOCH, step=self.step, total=self.tcfg.max_steps, epoch=self.epoch, metrics=rec)
        pat = self.tcfg.early_stopping_patience
        return pat is not None and self.epochs_since_best >= pat

    def _finish(self, stopped: bool) -> None:
        final = self.best_state if self.best_state is not None else self.ema
        if final is not None:
            self.model.ladder.load_state_dict(final)
        self.model.ladder.eval()
        self._update_info()
        self.model.info["stopped_early"] = stopped
        self.report(
            EventKind.STOPPED if stopped else EventKind.DONE,
            step=self.step,
            total=self.tcfg.max_steps,
            epoch=self.epoch,
            metrics={"best_loss": self.best_loss},
        )
