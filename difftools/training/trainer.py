"""Trainer on accelerate: one loop for CPU, one GPU and many GPUs (DDP via ``accelerate launch``).

Per step: x (pixels or cached latents) -> frozen autoencoder encode -> ``loss_fn(model, x0, y,
generator)`` under bf16 autocast on CUDA (fp32 on CPU) -> backward -> grad-norm clip -> AdamW with
linear warmup -> EMA update. A step whose gradient norm is NaN/inf is skipped on the device (fused
AdamW's ``found_inf``). Every ``log_every`` steps, and before every checkpoint or sample grid, the
per-step losses, gradient norms and the weights are checked (:mod:`difftools.training.health`; one
host sync per check, none per step) and logged to tqdm, ``metrics.jsonl`` and TensorBoard with
throughput and MFU. A run that diverged stops with :class:`DivergedError` and points ``latest`` at
the newest *vetted* checkpoint (:mod:`difftools.training.vetting`), so a checkpoint with NaN/inf
weights is never written and ``trainer.resume=auto`` continues from weights that train. One run per
run directory (:mod:`difftools.training.lock`).

Checkpoints follow :mod:`difftools.checkpoint` plus ``state/`` (optimizer, scheduler, RNG per rank,
step, data position, EMA count, loss-module parameters). Resuming restores all of it, so on CPU a
resumed run reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from difftools import checkpoint as ckpt_io
from difftools.training.ema import EMA
from difftools.training.grid import sample_images, save_grid
from difftools.training.health import (
    DivergedError,
    HealthMonitor,
    NonFiniteLossError,
    Verdict,
    all_finite,
    skip_flag,
)
from difftools.training.lock import RunDirLockedError, hold_run_dir
from difftools.training.state import BatchPlan, ResumableBatchSampler, capture_rng, restore_rng
from difftools.training.vetting import CheckpointVetting

log = logging.getLogger("difftools.train")


@dataclass
class TrainerConfig:
    """Options of :class:`Trainer` (the ``trainer`` config node). Every field is documented here."""

    batch_size: int = 64            #: GLOBAL batch over all devices; per-device = batch_size / world size
    max_steps: int = 1000           #: optimizer steps of the whole run (a resumed run continues to it)
    lr: float = 1e-4                #: peak AdamW learning rate
    warmup_steps: int = 100         #: linear warmup from lr/warmup to lr
    lr_decay: str = "constant"      #: after warmup: "constant" or "cosine" (down to lr * min_lr_ratio)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0          #: max global grad norm (0 = off)
    ema_decay: float = 0.9999
    ema_warmup: bool = True         #: decay_n = min(ema_decay, (1 + n) / (10 + n))
    mixed_precision: str = "auto"   #: auto (bf16 on CUDA, fp32 on CPU) | bf16 | no
    device: str = "auto"            #: auto (CUDA when present) | cpu
    seed: int = 0
    log_every: int = 50             #: also the NaN/inf check interval (and before every checkpoint)
    nonfinite_patience: int = 3     #: consecutive steps with a NaN/inf grad norm that are skipped and
    #:                                 tolerated (the loss finite); one more stops the run. 0 = stop at once
    divergence_factor: float = 0.0  #: stop when a step's loss > factor x median of the last
    #:                                 divergence_window losses (0 = off; per-step losses vary ~3x with t)
    divergence_window: int = 200    #: steps in that running median (the check starts once it is full)
    ckpt_every: int = 500           #: 0 = only the final checkpoint
    keep_last: int = 3              #: step checkpoints kept (0 = all)
    sample_every: int = 500         #: sample-grid PNG interval (0 = only at the end)
    sample_num: int = 100
    sample_solver: str = "ddim"
    sample_steps: int = 50
    sample_cfg_scale: float = 1.0   #: classifier-free guidance scale of the grids (1 = off)
    num_workers: int = -1           #: DataLoader workers; -1 = 0 on CPU, min(8, cores/world) on CUDA
    progress: bool = True           #: tqdm bar on the main process
    tensorboard: bool = True
    compile: bool = False           #: torch.compile the model (CUDA)
    tf32: bool = True               #: TF32 matmuls on CUDA
    cpu_threads: int | None = None  #: torch.set_num_threads on CPU (None = torch's default)
    peak_tflops: float = 790.0      #: MFU denominator (H100 dense bf16 as measured)
    resume: str | None = None       #: checkpoint dir / run dir / "auto" (this run's latest, if any)

    @classmethod
    def from_dict(cls, d) -> TrainerConfig:
        """From the ``trainer`` config node, every value checked against its field's type (and the
        fixed choices below): a wrong one is a ``difftools.config.ConfigError`` naming key, value
        and expected type, raised before anything is built."""
        from difftools.config import from_mapping
        from samplers.sampling import SOLVERS

        choices = {"lr_decay": ("constant", "cosine"), "mixed_precision": ("auto", "bf16", "no"),
                   "device": ("auto", "cpu"), "sample_solver": tuple(SOLVERS)}
        return from_mapping(cls, d, node="trainer", choices=choices)


@dataclass
class TrainResult:
    step: int
    final_loss: float                 #: mean loss over the last log window
    losses: list[float] = field(default_factory=list)  #: per-step losses of this process' run
    checkpoint: Path | None = None
    grid: Path | None = None
    seconds: float = 0.0


class TrainModule(nn.Module):
    """model + loss as one module, so DDP syncs the loss's own parameters (e.g. a projector) too
    and every step is one forward call."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        shared = {id(p) for p in model.parameters()} & {id(p) for p in loss_fn.parameters()}
        if shared:
            raise ValueError("the loss module holds the model's parameters; pass the model at call time "
                             "instead of storing it in the loss")

    def forward(self, x0, y, generator=None):
        return self.loss_fn(self.model, x0, y, generator=generator)


def make_accelerator(cfg: TrainerConfig):
    """The Accelerator for ``cfg``: bf16 autocast on CUDA, fp32 on CPU (``device="cpu"`` forces CPU)."""
    from accelerate import Accelerator

    if cfg.device not in ("auto", "cpu"):
        raise ValueError(f"trainer.device must be 'auto' or 'cpu', got {cfg.device!r}")
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    return Accelerator(mixed_precision=mp, cpu=cpu)


def _lr_lambda(cfg: TrainerConfig):
    def fn(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_decay == "cosine":
            span = max(1, cfg.max_steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    if cfg.lr_decay not in ("constant", "cosine"):
        raise ValueError(f"trainer.lr_decay must be 'constant' or 'cosine', got {cfg.lr_decay!r}")
    return fn


class Trainer:
    """Train ``model`` with ``loss_fn`` on ``dataset`` (items ``(x, label)``), writing to ``out_dir``.

    Args:
        model: the network (its weights are exported and EMA-averaged).
        loss_fn: ``loss_fn(model, x0, y, generator) -> (loss, logs)``; its parameters are trained
            and saved in ``state/loss.safetensors`` only.
        dataset: torch Dataset with ``.info`` (DatasetInfo); items of a dataset whose info name starts
            with ``latents`` are cached latents and are not encoded again. With
            ``dataset.random_flip`` the sampler hands out ``(index, flip)`` keys (resumable flips).
        config: :class:`TrainerConfig`.
        out_dir: run directory (``checkpoints/``, ``samples/``, ``tb/``, ``metrics.jsonl``).
        process, prediction, autoencoder: recorded in checkpoints; used for sample grids.
        run_config: the resolved run config (plain dict) written to each ``config.yaml``.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, dataset: Dataset, config: TrainerConfig,
                 out_dir: str | os.PathLike, *, process, prediction: str, autoencoder=None,
                 run_config: dict | None = None, accelerator=None):
        self.cfg = config
        self.out_dir = Path(out_dir)
        self.acc = accelerator or make_accelerator(config)
        self.device = self.acc.device
        if self.device.type == "cuda" and config.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.raw_model, self.loss_fn, self.dataset = model, loss_fn, dataset
        self.process, self.prediction = process, prediction
        self.autoencoder = autoencoder.to(self.device) if autoencoder is not None else None
        self.run_config = dict(run_config or {})
        info = getattr(dataset, "info", None)
        self.dataset_info = ckpt_io._plain(info) if info is not None else None
        # cached latents (data=latents) are already encoded
        self.encode_inputs = not str(getattr(info, "name", "")).startswith("latents")
        self.plan = BatchPlan(len(dataset), config.batch_size, self.acc.process_index, self.acc.num_processes,
                              config.seed, flip=bool(getattr(dataset, "random_flip", False)))
        self.step = 0
        self.losses: list[float] = []
        self.ckpt_root = self.out_dir / "checkpoints"
        self.last_checkpoint: Path | None = None
        self._writer = None
        self._ema_model = None

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def _setup(self) -> None:
        cfg = self.cfg
        if self.device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        torch.manual_seed(cfg.seed + self.acc.process_index)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(
            10_007 * (cfg.seed + 1) + self.acc.process_index)
        if cfg.compile:
            self.raw_model.compile()
        self.raw_model.to(self.device)
        self.loss_fn.to(self.device)
        module = TrainModule(self.raw_model, self.loss_fn)
        self.params = [p for p in module.parameters() if p.requires_grad]
        opt = self._make_optimizer()
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
        self.module, self.opt = self.acc.prepare(module, opt)
        self.ema = EMA(self.raw_model, cfg.ema_decay, cfg.ema_warmup)
        self.health = HealthMonitor(cfg.nonfinite_patience, cfg.divergence_factor, cfg.divergence_window)
        self.vetting = CheckpointVetting(self.ckpt_root, writer=self.is_main)
        resume = self._resume_path()
        if resume is not None:
            self._load(resume)
            self._apply_config_hyperparameters(resume)
        elif self.autoencoder is not None and self.encode_inputs and self.autoencoder.scale is None:
            self._fit_autoencoder_scale()
        self.vetting.start(self.step, resume)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            n_params = sum(p.numel() for p in self.raw_model.parameters())
            log.info("model %.2fM params, loss-module %d params; global batch %d = %d devices x %d; "
                     "mixed precision %s; device %s", n_params / 1e6,
                     sum(p.numel() for p in self.loss_fn.parameters()), cfg.batch_size,
                     self.acc.num_processes, self.plan.per_device, self.acc.mixed_precision, self.device)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW, fused where torch has a fused kernel for the device: only the fused kernel can skip
        a step on the device (``found_inf``) without a host sync."""
        cfg = self.cfg
        kw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self._can_skip = False
        if self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in self.params):
            try:
                opt = torch.optim.AdamW(self.params, fused=True, **kw)
                self._can_skip = True
                return opt
            except (RuntimeError, ValueError) as err:
                log.warning("fused AdamW unavailable (%s): steps with a NaN/inf gradient norm are applied, "
                            "not skipped", err)
        return torch.optim.AdamW(self.params, **kw)

    def _apply_config_hyperparameters(self, path: Path) -> None:
        """Use this run's lr, betas and weight decay after a resume (the optimizer and scheduler state
        carry the old run's), e.g. to continue a diverged run with a lower ``trainer.lr``."""
        cfg = self.cfg
        groups = self.opt.param_groups
        old = (self.sched.base_lrs[0], tuple(groups[0]["betas"]), groups[0]["weight_decay"])
        new = (cfg.lr, tuple(cfg.betas), cfg.weight_decay)
        if old == new:
            return
        if self.is_main:
            log.info("resumed from %s with lr %g, betas %s, weight decay %g (checkpoint: %g, %s, %g)",
                     path, *new, *old)
        self.sched.base_lrs = [cfg.lr] * len(groups)
        for group, fn in zip(groups, self.sched.lr_lambdas, strict=True):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * fn(self.sched.last_epoch)  # as LambdaLR computes it
            group["betas"], group["weight_decay"] = tuple(cfg.betas), cfg.weight_decay
        self.sched._last_lr = [group["lr"] for group in groups]

    def _fit_autoencoder_scale(self) -> None:
        """Latent scale from the same first images on every rank (else ranks would disagree)."""
        n = min(len(self.dataset), 256)
        x = torch.stack([self.dataset[i][0] for i in range(n)]).to(self.device)
        self.autoencoder.fit_scale(x)

    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if not r:
            return None
        if str(r) != "auto":
            return ckpt_io.resolve_checkpoint(r)
        latest = ckpt_io.read_latest(self.ckpt_root)  # repairs a replace interrupted half-way
        if latest is None:
            if self.is_main:
                log.info("trainer.resume=auto: no checkpoint in %s (no '%s' pointer); starting from step 0",
                         self.ckpt_root, ckpt_io.LATEST_FILE)
            return None
        if not latest.is_dir():
            raise ckpt_io.CheckpointError(
                f"trainer.resume=auto: {self.ckpt_root / ckpt_io.LATEST_FILE} names {latest.name}, but "
                f"{latest} does not exist (deleted?); pass trainer.resume=<an existing checkpoint dir> or "
                "trainer.resume=null")
        if self.is_main:
            log.info("trainer.resume=auto: resuming from %s (named by %s)", latest,
                     self.ckpt_root / ckpt_io.LATEST_FILE)
        return latest

    def _loader(self, start: int) -> DataLoader:
        workers = self.cfg.num_workers
        if workers < 0:
            cores = (os.cpu_count() or 1) // self.acc.num_processes
            workers = 0 if self.device.type != "cuda" else min(8, cores)
        return DataLoader(self.dataset, batch_sampler=ResumableBatchSampler(self.plan, start),
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(self.cfg.seed))

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run to ``max_steps`` holding the run directory's lock (refuses a second writer)."""
        with self._run_dir_lock():
            return self._train()

    def _run_dir_lock(self):
        """:func:`hold_run_dir` on the main process; the other ranks learn whether it refused."""
        stack = contextlib.ExitStack()
        refusal = None
        if self.is_main:
            try:
                stack.enter_context(hold_run_dir(self.out_dir))
            except RunDirLockedError as err:
                refusal = str(err)
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            stack.close()
            raise RunDirLockedError(refusal)
        return stack

    def _train(self) -> TrainResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        self._setup()
        batches = iter(self._loader(self.step))
        pbar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            pbar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        window: list[torch.Tensor] = []
        window_logs: dict[str, list[torch.Tensor]] = {}
        grad_norms: list[torch.Tensor] = []
        last_loss, grid = float("nan"), None
        timer = [time.perf_counter(), 0]
        # the grad norm is needed for the NaN/inf check even without clipping (max_norm=inf scales by 1)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        skip_optimizer = self._can_skip and getattr(self.acc, "scaler", None) is None
        while self.step < cfg.max_steps:
            x, y = next(batches)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.autoencoder is not None and self.encode_inputs:
                x = self.autoencoder.encode(x)
            self.module.train()
            with self.acc.autocast():
                loss, logs = self.module(x, y, generator=self.noise_gen)
            self.acc.backward(loss)
            grad_norm = self.acc.clip_grad_norm_(self.params, max_norm).detach()
            grad_norms.append(grad_norm)
            if skip_optimizer:  # a NaN/inf gradient leaves weights and moments as they were
                self.opt.optimizer.found_inf = skip_flag(grad_norm)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.ema.update(self.raw_model)
            self.step += 1
            timer[1] += 1
            window.append(loss.detach().float())
            for k, v in logs.items():
                window_logs.setdefault(k, []).append(torch.as_tensor(v).detach().float())
            if pbar is not None:
                pbar.update(1)
            is_last = self.step >= cfg.max_steps
            want_ckpt = is_last or (cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0)
            want_grid = is_last or (cfg.sample_every > 0 and self.step % cfg.sample_every == 0)
            if want_ckpt or want_grid or self.step % cfg.log_every == 0:
                # the check before a checkpoint: nothing with NaN/inf weights reaches disk
                last_loss = self._flush(window, window_logs, grad_norms, timer, pbar)
                window, window_logs, grad_norms = [], {}, []
            if want_ckpt:
                self.vetting.saved(self.step, self.save())
            if want_grid:
                grid = self.sample_grid()
            if want_ckpt or want_grid:
                timer[:] = [time.perf_counter(), 0]  # keep checkpoint/sampling time out of img/s
        if pbar is not None:
            pbar.close()
        if self._writer is not None:
            self._writer.close()
        self.acc.wait_for_everyone()
        return TrainResult(step=self.step, final_loss=last_loss, losses=list(self.losses),
                           checkpoint=self.last_checkpoint, grid=grid, seconds=time.perf_counter() - t_start)

    def _weights(self):
        """Everything a checkpoint stores as weights: model and loss-module state, EMA."""
        yield from self.raw_model.state_dict().values()
        yield from self.loss_fn.state_dict().values()
        yield from self.ema.state_dict().values()

    def _flush(self, window, window_logs, grad_norms, timer, pbar) -> float:
        """Check and log the steps since the last flush (one host sync); on a divergence, point
        ``latest`` at the newest vetted checkpoint and raise :class:`DivergedError`."""
        if not window:
            return self.losses[-1] if self.losses else float("nan")
        n = len(window)
        losses = self.acc.reduce(torch.stack(window), reduction="mean")
        norms = torch.stack(grad_norms).float()
        weights_ok = all_finite(self._weights()).to(losses.device)
        packed = torch.cat([losses.float(), norms.to(losses.device), weights_ok.float().view(1)]).cpu()
        values, norm_values = packed[:n].tolist(), packed[n:2 * n].tolist()
        first = self.step - n + 1
        verdict = self.health.check(first, values, norm_values, weights_finite=bool(packed[-1]))
        self.vetting.observe(first, verdict.ok)
        if verdict.stop:
            self._stop(verdict, values)
        if verdict.skipped and self.is_main:
            log.warning("step(s) %s: gradient norm NaN/inf, update skipped (up to "
                        "trainer.nonfinite_patience=%d in a row are tolerated)", verdict.skipped,
                        self.cfg.nonfinite_patience)
        self.losses.extend(values)
        mean_loss = sum(values) / len(values)
        dt = max(time.perf_counter() - timer[0], 1e-9)
        img_s = timer[1] * self.cfg.batch_size / dt
        record = {"step": self.step, "epoch": self.plan.position(self.step)[0], "loss": mean_loss,
                  "lr": self.sched.get_last_lr()[0], "it_per_s": timer[1] / dt, "img_per_s": img_s,
                  "grad_norm": sum(norm_values) / n}
        if verdict.skipped:
            record["skipped_steps"] = len(verdict.skipped)
        for k, vs in window_logs.items():
            record[k] = self.acc.reduce(torch.stack(vs), reduction="mean").mean().item()
        flops = getattr(self.raw_model, "flops_per_image", None)
        if flops is not None:
            tflops = 3.0 * flops() * img_s / 1e12  # backward = 2x forward
            record["tflops"] = tflops
            if self.device.type == "cuda":
                record["mfu"] = tflops / (self.cfg.peak_tflops * self.acc.num_processes)
        self._log_json(record)
        if pbar is not None:
            pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.0f}")
        return mean_loss

    def _stop(self, verdict: Verdict, values: list[float]) -> None:
        """Fall back to the newest vetted checkpoint and raise with a message that names it."""
        vetted, unvetted = self.vetting.fall_back()
        vetted_means = "finite weights, and the step after it trained with a finite loss and gradient"
        if vetted is not None:
            where = (f"The newest vetted checkpoint ({vetted_means}) is {vetted}; "
                     f"{self.ckpt_root / ckpt_io.LATEST_FILE} now names it, so trainer.resume=auto continues "
                     "from it.")
        else:
            where = f"No checkpoint of this run is vetted ({vetted_means}): start again from scratch."
        if unvetted:
            where += (f" Not vetted (written before the divergence showed; do not resume from them): "
                      f"{', '.join(p.name for p in unvetted)}.")
        msg = (f"{verdict.reason}: stopping. Nothing was written after that step. {where} "
               "Try a lower trainer.lr or trainer.grad_clip.")
        event = {"step": verdict.stop_step, "event": verdict.stop_kind,
                 "vetted": str(vetted) if vetted is not None else None}
        if verdict.stop_kind == "nonfinite_loss":
            event["loss"] = str(values[verdict.stop_step - verdict.first_step])
        self._log_json(event)
        raise (NonFiniteLossError if verdict.stop_kind == "nonfinite_loss" else DivergedError)(msg)

    def _log_json(self, record: dict) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.cfg.tensorboard and "event" not in record:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out_dir / "tb"))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._writer.add_scalar(f"train/{k}", v, record["step"])

    # ------------------------------------------------------------------ samples
    def ema_model(self) -> nn.Module:
        """A copy of the model holding the EMA weights (for sampling)."""
        if self._ema_model is None:
            self._ema_model = copy.deepcopy(self.raw_model).eval().requires_grad_(False)
        return self.ema.copy_to(self._ema_model)

    def sample_grid(self) -> Path | None:
        path = None
        if self.is_main:
            cfg = self.cfg
            images = sample_images(self.ema_model(), self.process, self.prediction, self.autoencoder,
                                   num_samples=cfg.sample_num, solver=cfg.sample_solver,
                                   steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg_scale,
                                   seed=cfg.seed, device=self.device)
            nrow = getattr(self.raw_model, "num_classes", 0) or int(math.sqrt(cfg.sample_num))
            path = save_grid(images, self.out_dir / "samples" / f"step_{self.step:07d}.png", nrow=nrow)
            log.info("step %d: sample grid %s", self.step, path)
        self.acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_config(self) -> dict:
        config = dict(self.run_config)
        config["checkpoint"] = ckpt_io.checkpoint_meta(
            self.raw_model, kind="dit", process=self.process, prediction=self.prediction,
            autoencoder=self.autoencoder, dataset_info=self.dataset_info, step=self.step)
        return config

    def save(self) -> Path:
        """Write ``checkpoints/step_XXXXXXX`` atomically, then move ``latest``, then prune old ones."""
        path = self.ckpt_root / f"step_{self.step:07d}"
        tmp = ckpt_io.tmp_path_for(path)
        if self.is_main:
            ckpt_io.begin_directory(path)
            (tmp / ckpt_io.STATE_DIR).mkdir()
        self.acc.wait_for_everyone()
        state = tmp / ckpt_io.STATE_DIR
        torch.save(capture_rng(self.noise_gen), state / f"rng_{self.acc.process_index}.pt")
        if self.is_main:
            ckpt_io.save_weights(tmp / ckpt_io.MODEL_FILE, self.raw_model.state_dict())
            ckpt_io.save_weights(tmp / ckpt_io.EMA_FILE, self.ema.state_dict())
            loss_state = self.loss_fn.state_dict()
            if loss_state:
                ckpt_io.save_weights(state / "loss.safetensors", loss_state)
            torch.save(self.opt.state_dict(), state / "optimizer.pt")
            torch.save(self.sched.state_dict(), state / "scheduler.pt")
            epoch, batch = self.plan.position(self.step)
            trainer_state = {"step": self.step, "batches_consumed": self.step, "epoch": epoch,
                             "batch_in_epoch": batch, "ema_updates": self.ema.num_updates,
                             "global_batch": self.cfg.batch_size, "world_size": self.acc.num_processes,
                             "seed": self.cfg.seed, "trainer": asdict(self.cfg)}
            (state / "trainer.json").write_text(json.dumps(trainer_state, indent=1, default=str))
            # after every weight file: config.yaml records their sha256 (checked on load)
            config = ckpt_io.record_weight_hashes(self.checkpoint_config(), tmp)
            ckpt_io.save_config(tmp / ckpt_io.CONFIG_FILE, config)
            self._before_commit(tmp)
            ckpt_io.commit_directory(tmp, path)
            ckpt_io.write_latest(self.ckpt_root, path.name)
            ckpt_io.prune_checkpoints(self.ckpt_root, self.cfg.keep_last, keep=self.vetting.protected())
        self.acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def _before_commit(self, tmp: Path) -> None:
        """Called with the complete temporary directory just before the atomic rename (tests
        simulate a crash here)."""

    def _load(self, path: Path) -> None:
        """Restore weights, EMA, loss parameters, optimizer, scheduler, step, data position, RNG."""
        state = path / ckpt_io.STATE_DIR
        meta = ckpt_io.read_json(ckpt_io.require_file(path, f"{ckpt_io.STATE_DIR}/trainer.json"))
        if meta.get("global_batch") != self.cfg.batch_size:
            raise ckpt_io.CheckpointError(
                f"{path} was trained with global batch {meta.get('global_batch')}, this run uses "
                f"{self.cfg.batch_size}: the data order would differ; set trainer.batch_size to match")
        # weight files are checked against the sha256 in config.yaml and for NaN/inf
        node = ckpt_io.checkpoint_node(ckpt_io.load_config(path), path / ckpt_io.CONFIG_FILE)
        self.raw_model.load_state_dict(ckpt_io.read_checkpoint_weights(path, ckpt_io.MODEL_FILE, node))
        if (state / "loss.safetensors").is_file():
            loss_state = ckpt_io.read_checkpoint_weights(path, "state/loss.safetensors", node)
            self.loss_fn.load_state_dict(loss_state)
        elif self.loss_fn.state_dict():
            raise ckpt_io.CheckpointError(f"{path} has no state/loss.safetensors, but this loss has "
                                          "parameters")
        ema_state = ckpt_io.read_checkpoint_weights(path, ckpt_io.EMA_FILE, node)
        self.ema.load_state_dict(ema_state, meta["ema_updates"])
        self.opt.load_state_dict(ckpt_io.torch_load(ckpt_io.require_file(path, "state/optimizer.pt")))
        self.sched.load_state_dict(ckpt_io.torch_load(ckpt_io.require_file(path, "state/scheduler.pt")))
        self.step = int(meta["step"])
        ae_cfg = node["autoencoder"] or {}
        if self.autoencoder is not None and ae_cfg.get("scale") is not None:
            self.autoencoder.scale, self.autoencoder.shift = ae_cfg["scale"], ae_cfg.get("shift")
        rng_file = state / f"rng_{self.acc.process_index}.pt"
        if rng_file.is_file():
            restore_rng(ckpt_io.torch_load(rng_file), self.noise_gen)
        else:
            log.warning("%s has no RNG state for rank %d (world size changed?): fresh seeds; the data order "
                        "is unchanged, noise draws differ", path, self.acc.process_index)
        self.last_checkpoint = path
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)
