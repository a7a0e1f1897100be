"""The training engine: one loop for every recipe, on CPU, one GPU and many GPUs (DDP or FSDP2 via
``scripts/launch.sh`` / ``accelerate launch``; several CPU processes over gloo).

A recipe is an :class:`~difftools.training.objective.Objective` (what a step computes from a
batch); everything else is here. Per optimizer step: ``grad_accum`` micro-batches, each
``loss, logs = objective(batch, generator)`` under bf16 autocast on CUDA (fp32 on CPU) and a
backward of ``loss / grad_accum`` (DDP all-reduces on the last one only) -> global grad-norm clip
-> optimizer (:mod:`.optim`: AdamW or SGD, warmup then constant / cosine / linear decay) -> EMA
update of ``objective.model`` -> ``objective.after_step``. A step whose gradient norm is NaN/inf
is skipped on the device (a fused optimizer's ``found_inf``). Every ``log_every`` steps, and before
every checkpoint, preview or evaluation, the per-step losses, gradient norms and the weights are
checked (:mod:`.health`; one host sync per check, none per step) and logged to tqdm,
``metrics.jsonl`` and TensorBoard (:mod:`.metrics_log`) with throughput and MFU. A run that
diverged stops with :class:`DivergedError` and points ``latest`` at the newest *vetted*
checkpoint (:mod:`.vetting`), so a checkpoint with NaN/inf weights is never written and
``trainer.resume=auto`` continues from weights that train. One run per run directory (:mod:`.lock`).

Checkpoint layout (the same for every recipe; :mod:`difftools.checkpoint` reads the first three)::

    step_XXXXXXX/model.safetensors        objective.model
                 ema.safetensors          its EMA (= the model's weights when ema_decay = 0)
                 config.yaml              run config + ``checkpoint`` node (objective.checkpoint_meta,
                                          the sha256 of every .safetensors file)
                 state/optimizer.pt, scheduler.pt
                 state/trainer.json       step, data position, EMA count, batch, world size, options
                 state/objective.safetensors   trained submodules besides the model + extra state
                 state/rng_<rank>.pt      python / numpy / torch / CUDA RNG and the noise generator

Resuming restores all of it, so on CPU a resumed run reproduces the uninterrupted run's losses
bit for bit. Checkpoints hold full tensors also under FSDP (:mod:`.sharding`), and the data order is a
function of the global batch index alone (:mod:`.state`), so a run resumes on another number of
processes; with an objective that draws its noise for the global batch (``global_batch_noise``) it
then computes what an uninterrupted run computes, up to the order of float sums. The state files
of the loops that existed before this engine are not read (except a former DiT checkpoint without an
alignment projector, whose files are the same).
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
from difftools.config import from_mapping
from difftools.device import keep_nvlink_multicast_off, lone_cpu_launch
from difftools.nn.fp8 import RECIPES as FP8_RECIPES
from difftools.nn.fp8 import float8_token_gemms, require_float8_device, require_torchao
from difftools.training.device_data import DATA_ON_DEVICE, DeviceBatches, use_device_data
from difftools.training.ema import EMA
from difftools.training.graphed import GraphedStep, make_capturable, make_uncapturable
from difftools.training.health import (
    DivergedError,
    HealthMonitor,
    NonFiniteLossError,
    Verdict,
    all_finite,
    skip_flag,
)
from difftools.training.lock import RunDirLockedError, hold_run_dir
from difftools.training.metrics_log import MetricsLog
from difftools.training.objective import (
    Objective,
    RunInfo,
    check_model_not_shared,
    frozen_parameter_names,
    load_trained_state,
    trained_state,
)
from difftools.training.optim import apply_config, build_optimizer, lr_lambda
from difftools.training.sharding import (
    full_optimizer_state,
    full_state,
    full_value,
    local_shard,
    shard_like,
    shard_optimizer_state,
)
from difftools.training.state import BatchPlan, ResumableBatchSampler, capture_rng, restore_rng
from difftools.training.vetting import CheckpointVetting
from samplers.sampling import SOLVERS

log = logging.getLogger("difftools.train")

OBJECTIVE_STATE = "objective.safetensors"


@dataclass
class TrainerConfig:
    """Options of :class:`Trainer` (the ``trainer`` config node). Every field is documented here."""

    batch_size: int = 64            #: GLOBAL batch of one forward pass over all devices; per device:
    #:                                 batch_size / world size; an optimizer step sees batch_size x grad_accum
    grad_accum: int = 1             #: micro-batches (forward + backward) per optimizer step
    max_steps: int = 1000           #: optimizer steps of the whole run (a resumed run continues to it)
    time_limit: float | None = None  #: seconds of training after which the run stops cleanly with a
    #:                                 checkpoint (checked every step; with several processes at log steps)
    optimizer: str = "adamw"        #: adamw | sgd
    lr: float = 1e-4                #: peak learning rate
    warmup_steps: int = 100         #: linear warmup from lr/warmup to lr
    lr_decay: str = "constant"      #: after warmup: constant | cosine (to lr * min_lr_ratio) | linear (to 0)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    no_decay_1d: bool = False       #: no weight decay on 1-D parameters (biases, norm scales)
    betas: tuple[float, float] = (0.9, 0.999)  #: adamw
    momentum: float = 0.9           #: sgd
    nesterov: bool = False          #: sgd
    grad_clip: float = 1.0          #: max global grad norm (0 = off)
    ema_decay: float = 0.9999       #: 0 = no EMA (ema.safetensors then holds the model's weights)
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
    eval_every: int = 0             #: objective.evaluate interval (0 = off); when > 0 also at the end
    eval_at: list[int] = field(default_factory=list)  #: further steps to evaluate at
    sample_every: int = 500         #: objective.preview interval (0 = only at the end)
    sample_num: int = 100           #: sample_*: the DiT recipe's preview grids (SampleGrid.from_config)
    sample_solver: str = "ddim"
    sample_steps: int = 50
    sample_cfg_scale: float = 1.0   #: classifier-free guidance scale of the grids (1 = off)
    num_workers: int = -1           #: DataLoader workers; -1 = 0 on CPU, min(8, cores/world) on CUDA
    data_on_device: str = "auto"    #: auto | on | off: gather batches on the device from a copy of an
    #:                                 in-memory dataset (same batches as the loader; .device_data)
    cuda_graphs: bool = False       #: replay the whole optimizer step as one CUDA graph (.graphed; one
    #:                                 process, CUDA, adamw, grad_accum 1): for launch-bound small models
    progress: bool = True           #: tqdm bar on the main process
    tensorboard: bool = True
    compile: bool = False           #: torch.compile the model (CUDA)
    fp8: str | None = None          #: null | tensorwise | rowwise: the token GEMMs of every transformer
    #:                                 block (attn.qkv/proj, mlp.fc1/fc2) in float8 (torchao, the fp8
    #:                                 extra; CUDA compute capability >= 8.9; difftools.nn.fp8). Weights,
    #:                                 checkpoints and previews stay as without it
    tf32: bool = True               #: TF32 matmuls on CUDA
    cpu_threads: int | None = None  #: torch.set_num_threads on CPU (None = torch's default)
    peak_tflops: float = 790.0      #: MFU denominator (H100 dense bf16 as measured)
    resume: str | None = None       #: checkpoint dir / run dir / "auto" (this run's latest, if any)

    @classmethod
    def from_dict(cls, d) -> TrainerConfig:
        """From the ``trainer`` config node, every value checked against its field's type (and the
        fixed choices below): a wrong one is a ``difftools.config.ConfigError`` naming key, value
        and expected type, raised before anything is built."""
        choices = {"lr_decay": ("constant", "cosine", "linear"), "optimizer": ("adamw", "sgd"),
                   "mixed_precision": ("auto", "bf16", "no"), "device": ("auto", "cpu"),
                   "data_on_device": DATA_ON_DEVICE, "fp8": (None, *FP8_RECIPES),
                   "sample_solver": tuple(SOLVERS)}
        return from_mapping(cls, d, node="trainer", choices=choices)


@dataclass
class TrainResult:
    step: int
    final_loss: float                 #: mean loss over the last log window
    losses: list[float] = field(default_factory=list)  #: per-step losses of this process' run
    checkpoint: Path | None = None
    grid: Path | None = None          #: the last preview written
    evaluations: list[dict] = field(default_factory=list)  #: {"step": k, **objective.evaluate(...)}
    stopped_by: str = "max_steps"     #: max_steps | time_limit
    seconds: float = 0.0


def make_accelerator(cfg: TrainerConfig):
    """The Accelerator for ``cfg``: bf16 autocast on CUDA, fp32 on CPU (``device="cpu"`` forces CPU;
    several processes on the CPU talk through gloo). NVLink multicast stays off
    (:func:`difftools.device.keep_nvlink_multicast_off`)."""
    from accelerate import Accelerator

    if cfg.device not in ("auto", "cpu"):
        raise ValueError(f"trainer.device must be 'auto' or 'cpu', got {cfg.device!r}")
    keep_nvlink_multicast_off()  # before the process group exists; inherited by child processes
    problem = lone_cpu_launch()
    if problem:
        log.warning(problem)
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    acc = Accelerator(mixed_precision=mp, cpu=cpu)
    if cpu and acc.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        _fsdp_on_cpu(acc)
    return acc


def check_fp8(cfg: TrainerConfig, device: torch.device) -> None:
    """``trainer.fp8``'s requirements when it is set: a known recipe (ValueError naming the choices),
    torchao and a GPU with float8 tensor cores (:class:`~difftools.nn.fp8.Float8Unavailable` saying
    which is missing). ``train/dit.py`` calls it before building anything; :class:`Trainer` again."""
    if cfg.fp8 is None:
        return
    setting = f"trainer.fp8={cfg.fp8!r}"
    if cfg.fp8 not in FP8_RECIPES:
        raise ValueError(f"{setting} is not a float8 recipe; choose one of {', '.join(FP8_RECIPES)} "
                         "or null (off)")
    require_torchao()
    require_float8_device(device, setting)


def _fsdp_on_cpu(acc) -> None:
    """Install accelerate's FSDP plugin on a CPU (gloo) process group.

    accelerate applies the plugin only to GPU-like process groups and otherwise silently trains
    with DDP. The plugin is built here from the same ``FSDP_*`` environment that ``accelerate
    launch`` (an FSDP config file) set, so an FSDP launch is FSDP on a CPU-only host too: slowly,
    but it is how the FSDP path (sharded EMA, full-state checkpoints) is tested without GPUs."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    acc.state.distributed_type = DistributedType.FSDP
    # as accelerate does for GPUs: a later AcceleratorState() copies the type back from PartialState
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _to_device(batch, device: torch.device):
    """Tensors in (nested) tuples, lists and dicts moved to ``device``; anything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class Trainer:
    """Train ``objective`` as configured, writing to ``out_dir``.

    Args:
        objective: the recipe (:class:`~difftools.training.objective.Objective`); its trainable
            parameters are every parameter with ``requires_grad`` outside frozen helpers.
        config: :class:`TrainerConfig`.
        out_dir: run directory (``checkpoints/``, ``samples/``, ``tb/``, ``metrics.jsonl``,
            ``run.lock``). None: an in-memory run that writes nothing (no checkpoints, previews,
            metrics or lock; ``resume`` must be unset).
        dataset: torch Dataset of the engine's data loader (items as the objective's ``forward``
            expects them; with ``dataset.random_flip`` the sampler hands out ``(index, flip)`` keys),
            used unless ``objective.batches`` supplies the data.
        run_config: the resolved run config (plain dict) written to each ``config.yaml``.
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).

    Example::

        objective = DenoisingObjective(model, DenoisingLoss(Flow(), "flow"), Flow(), "flow",
                                       dataset_info=dataset.info)
        result = Trainer(objective, TrainerConfig(max_steps=1000), "runs/x", dataset=dataset).train()
        result.losses, result.checkpoint      # per-step losses, runs/x/checkpoints/step_0001000
    """

    def __init__(self, objective: Objective, config: TrainerConfig, out_dir: str | os.PathLike | None = None,
                 *, dataset: Dataset | None = None, run_config: dict | None = None, accelerator=None):
        if not isinstance(objective, Objective):
            raise TypeError(f"Trainer needs a difftools.training.Objective, got {type(objective).__name__}")
        if config.grad_accum < 1:
            raise ValueError(f"trainer.grad_accum must be >= 1, got {config.grad_accum}")
        if out_dir is None and config.resume:
            raise ValueError("trainer.resume needs a run directory (out_dir); this run writes nothing")
        self.cfg = config
        self.objective, self.dataset = objective, dataset
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.acc = accelerator or make_accelerator(config)
        self.device = self.acc.device
        check_fp8(config, self.device)  # before anything is built or written
        if self.device.type == "cuda" and config.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.run_config = dict(run_config or {})
        self.plan = None
        if dataset is not None:
            self.plan = BatchPlan(len(dataset), config.batch_size, self.acc.process_index,
                                  self.acc.num_processes, config.seed,
                                  flip=bool(getattr(dataset, "random_flip", False)))
        elif config.batch_size % self.acc.num_processes:
            raise ValueError(f"global batch {config.batch_size} is not divisible by the world size "
                             f"{self.acc.num_processes}")
        self.step = 0
        self.losses: list[float] = []
        self.ckpt_root = self.out_dir / "checkpoints" if self.out_dir is not None else None
        self.last_checkpoint: Path | None = None
        self.metrics = MetricsLog(self.out_dir, config.tensorboard, enabled=self.is_main)
        self._ema_model = None
        self._uses_loader = False
        self._graphed: GraphedStep | None = None

    @property
    def model(self) -> nn.Module:
        """The trained network (``objective.model``, not wrapped)."""
        return self.objective.model

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        if self.device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        torch.manual_seed(cfg.seed + self.acc.process_index)
        # one noise stream for every process when the objective draws for the global batch
        noise_rank = 0 if self.objective.global_batch_noise else self.acc.process_index
        self.generator = torch.Generator(device=self.device).manual_seed(10_007 * (cfg.seed + 1) + noise_rank)
        check_model_not_shared(self.objective)
        if cfg.fp8 is not None:
            self._convert_fp8()
        if cfg.compile:
            self.model.compile()
            if self._ema_model is not None:
                self._ema_model.compile()
        self.objective.to(self.device)
        if self._ema_model is not None:
            self._ema_model.to(self.device)
        frozen = frozen_parameter_names(self.objective)
        if frozen and self.acc.num_processes > 1:  # frozen helpers: no gradient or buffer sync
            from torch.nn.parallel import DistributedDataParallel

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.objective, frozen)
        named = [(n, p) for n, p in self.objective.named_parameters() if p.requires_grad]
        opt, self._can_skip = build_optimizer(named, cfg, self.device)
        if cfg.cuda_graphs:
            self._check_graphable()
            make_capturable(opt, self.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        if self._fsdp():
            # FSDP shards self.model in place: previews and evaluations sample an unsharded copy (one full
            # model per process: FSDP is for runs whose training state, not weights, outgrows a GPU);
            # with trainer.fp8 that copy exists already (made before the conversion)
            if self._ema_model is None:
                self._ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            if self.acc.mixed_precision == "bf16":
                from torch.distributed.fsdp import MixedPrecisionPolicy

                # accelerate's bf16 policy also reduces gradients in bf16; reduce in fp32, as DDP does
                self.acc.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        self.module, self.opt = self.acc.prepare(self.objective, opt)
        # FSDP replaces the parameters by sharded ones (the optimizer was switched to them)
        self.params = [p for _, p in self.objective.named_parameters() if p.requires_grad]
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.health = HealthMonitor(cfg.nonfinite_patience, cfg.divergence_factor, cfg.divergence_window)
        self.vetting = (CheckpointVetting(self.ckpt_root, writer=self.is_main)
                        if self.ckpt_root is not None else None)
        self.run_info = RunInfo(self.acc, cfg, self.generator, self.dataset, self.out_dir)
        resume = self._resume_path()
        if resume is not None:
            self._load(resume)
            changed = apply_config(self.opt, self.sched, cfg)
            if changed and self.is_main:
                log.info("resumed from %s with %s (checkpoint: %s)", resume, changed[1], changed[0])
        if not cfg.cuda_graphs:
            make_uncapturable(self.opt.optimizer)  # a checkpoint of a graphed run holds a tensor lr
        else:
            make_capturable(self.opt.optimizer, self.device)  # a resumed state may hold a float lr
            dtype = torch.bfloat16 if self.acc.mixed_precision == "bf16" else None
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            self._graphed = GraphedStep(self.objective, self.model, self.params, self.opt.optimizer,
                                        self.generator, self.ema, max_norm, self._can_skip, dtype)
        self.objective.on_start(self.run_info, resume)
        if self.vetting is not None:
            self.vetting.start(self.step, resume)
        if self.is_main:
            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            n_model = sum(p.numel() for p in self.model.parameters())
            n_other = sum(p.numel() for p in self.params) - sum(
                p.numel() for p in self.model.parameters() if p.requires_grad)
            log.info("model %.2fM params, other trained %d params (%s); global batch %d = %d devices x %d%s; "
                     "mixed precision %s; device %s; data parallel: %s", n_model / 1e6, n_other,
                     type(self.objective).__name__, cfg.batch_size, self.acc.num_processes,
                     cfg.batch_size // self.acc.num_processes,
                     f", {cfg.grad_accum} micro-batches per step" if cfg.grad_accum > 1 else "",
                     self.acc.mixed_precision, self.device, self._data_parallel())

    def _convert_fp8(self) -> None:
        """trainer.fp8: the token GEMMs of the model's blocks in float8, before compile. Previews and
        evaluations sample a copy made before the conversion: fp8 is how the training matmuls run, not
        part of the model (same parameters, same state dict; checkpoints load as the plain model)."""
        self._ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        names = float8_token_gemms(self.model, self.cfg.fp8)
        if self.is_main:
            log.info("trainer.fp8=%s: %d token GEMMs in float8 (%s ... %s); every other layer as configured",
                     self.cfg.fp8, len(names), names[0], names[-1])

    def _fsdp(self) -> bool:
        """Whether the objective is sharded with FSDP (accelerate's plugin; FSDP2 only)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.FSDP:
            return False
        if not self.acc.is_fsdp2:
            raise ValueError("the difftools trainer shards with FSDP2 (accelerate config fsdp_version: 2, "
                             "e.g. conf/accelerate/fsdp_8gpu.yaml); FSDP1 is not supported")
        return True

    def _data_parallel(self) -> str:
        """How the processes share the work: FSDP2, DDP or none (one process)."""
        if self.acc.num_processes == 1:
            return "none"
        return "FSDP2" if self._fsdp() else "DDP"

    def _check_graphable(self) -> None:
        """trainer.cuda_graphs' requirements, each failure naming the option to change."""
        cfg, problems = self.cfg, []
        if self.device.type != "cuda":
            problems.append(f"the run is on {self.device}, not CUDA")
        if self.acc.num_processes > 1:
            problems.append(f"{self.acc.num_processes} processes (one only)")
        if cfg.grad_accum != 1:
            problems.append(f"trainer.grad_accum={cfg.grad_accum} (1 only)")
        if cfg.optimizer != "adamw" or not self._can_skip:
            problems.append(f"trainer.optimizer={cfg.optimizer} (fused adamw only)")
        if problems:
            raise ValueError("trainer.cuda_graphs=true cannot capture this run: " + "; ".join(problems)
                             + ". Set trainer.cuda_graphs=false.")

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from (None: a fresh run). With several processes the main process
        resolves it (repairing a replace interrupted half-way, which must happen once) and the others
        follow, so every process loads the same checkpoint."""
        if self.acc.num_processes == 1 or not self.cfg.resume:
            return self._find_resume()
        from accelerate.utils import broadcast_object_list

        found, error = None, None
        if self.is_main:
            try:
                found = self._find_resume()
            except ckpt_io.CheckpointError as err:
                error = str(err)
        found, error = broadcast_object_list([found, error])
        if error is not None:
            raise ckpt_io.CheckpointError(error)
        return found

    def _find_resume(self) -> Path | None:
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

    def _batches(self):
        """Infinite iterator of this process's batches, from batch ``step * grad_accum`` on."""
        start = self.step * self.cfg.grad_accum
        own = self.objective.batches(start, self.run_info)
        if own is not None:
            return iter(own)
        if self.dataset is None:
            raise ValueError(f"{type(self.objective).__name__} supplies no batches (Objective.batches "
                             "returned None) and the Trainer got no dataset")
        self._uses_loader = True
        if use_device_data(self.cfg.data_on_device, self.dataset, self.device):
            return DeviceBatches(self.dataset, self.plan, start, self.device)
        workers = self.cfg.num_workers
        if workers < 0:
            cores = (os.cpu_count() or 1) // self.acc.num_processes
            workers = 0 if self.device.type != "cuda" else min(8, cores)
        return iter(DataLoader(self.dataset, batch_sampler=ResumableBatchSampler(self.plan, start),
                               num_workers=workers, pin_memory=self.device.type == "cuda",
                               persistent_workers=workers > 0,
                               generator=torch.Generator().manual_seed(self.cfg.seed)))

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run to ``max_steps`` (or ``time_limit``) holding the run directory's lock (refuses a
        second writer)."""
        with self._run_dir_lock():
            try:
                return self._train()
            finally:
                self.metrics.close()

    def _run_dir_lock(self):
        """:func:`hold_run_dir` on the main process; the other ranks learn whether it refused."""
        stack = contextlib.ExitStack()
        if self.out_dir is None:
            return stack
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
        batches = self._batches()
        pbar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            pbar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        window: list[torch.Tensor] = []
        window_logs: dict[str, list[torch.Tensor]] = {}
        grad_norms: list[torch.Tensor] = []
        last_loss, grid, evaluations, stopped_by = float("nan"), None, [], "max_steps"
        timer = [time.perf_counter(), 0]
        t_loop = time.perf_counter()
        # the grad norm is needed for the NaN/inf check even without clipping (max_norm=inf scales by 1)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        skip_optimizer = self._can_skip and getattr(self.acc, "scaler", None) is None
        self.objective.train()
        while self.step < cfg.max_steps:
            if self._graphed is not None:  # the whole step, optimizer and EMA included, as one graph
                loss, logs, grad_norm = self._graphed(_to_device(next(batches), self.device))
                self.sched.step()
            else:
                loss, logs = self._forward_backward(batches)
                grad_norm = full_value(self.acc.clip_grad_norm_(self.params, max_norm)).detach()
                if skip_optimizer:  # a NaN/inf gradient leaves weights and moments as they were
                    self.opt.optimizer.found_inf = skip_flag(grad_norm)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
            grad_norms.append(grad_norm)
            self.step += 1
            logs.update(self.objective.after_step(self.step))
            timer[1] += 1
            window.append(loss)
            for k, v in logs.items():
                window_logs.setdefault(k, []).append(torch.as_tensor(v).detach().float())
            if pbar is not None:
                pbar.update(1)
            log_step = self.step % cfg.log_every == 0
            if self._time_is_up(t_loop, log_step):
                stopped_by = "time_limit"
            is_last = self.step >= cfg.max_steps or stopped_by == "time_limit"
            want_ckpt = self.out_dir is not None and (
                is_last or (cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0))
            want_grid = self.out_dir is not None and (
                is_last or (cfg.sample_every > 0 and self.step % cfg.sample_every == 0))
            want_eval = ((cfg.eval_every > 0 and (is_last or self.step % cfg.eval_every == 0))
                         or self.step in cfg.eval_at)
            if want_ckpt or want_grid or want_eval or log_step:
                # the check before a checkpoint: nothing with NaN/inf weights reaches disk
                last_loss = self._flush(window, window_logs, grad_norms, timer, pbar)
                window, window_logs, grad_norms = [], {}, []
            if want_ckpt:
                saved = self.save()
                self.vetting.saved(self.step, saved)
            if want_grid:
                grid = self.preview() or grid
            if want_eval:
                evaluations.append(self.evaluate())
            if want_ckpt or want_grid or want_eval:
                self.objective.train()  # callbacks may have switched modes
                timer[:] = [time.perf_counter(), 0]  # keep checkpoint/sampling time out of img/s
            if stopped_by == "time_limit":
                if self.is_main:
                    log.info("trainer.time_limit=%gs reached at step %d: stopped", cfg.time_limit, self.step)
                break
        if pbar is not None:
            pbar.close()
        self.acc.wait_for_everyone()
        return TrainResult(step=self.step, final_loss=last_loss, losses=list(self.losses),
                           checkpoint=self.last_checkpoint, grid=grid, evaluations=evaluations,
                           stopped_by=stopped_by, seconds=time.perf_counter() - t_start)

    def _forward_backward(self, batches) -> tuple[torch.Tensor, dict]:
        """``grad_accum`` micro-batches: forward, backward of loss / grad_accum; returns the step's
        mean loss and logs (detached, on the device)."""
        accum = self.cfg.grad_accum
        losses, logs = [], {}
        for i in range(accum):
            batch = _to_device(next(batches), self.device)
            last = i == accum - 1
            # DDP all-reduces gradients on the last micro-batch only
            with contextlib.nullcontext() if last else self.acc.no_sync(self.module):
                with self.acc.autocast():
                    loss, micro_logs = self.module(batch, self.generator)
                self.acc.backward(loss / accum)
            losses.append(loss.detach().float())
            for k, v in micro_logs.items():
                logs.setdefault(k, []).append(torch.as_tensor(v).detach().float())
        if accum == 1:
            return losses[0], {k: vs[0] for k, vs in logs.items()}
        return torch.stack(losses).mean(), {k: torch.stack(vs).mean() for k, vs in logs.items()}

    def _time_is_up(self, t_loop: float, log_step: bool) -> bool:
        """Whether ``time_limit`` has passed; several processes decide together at log steps (rank 0's
        clock), so that they stop at the same step."""
        limit = self.cfg.time_limit
        if limit is None:
            return False
        up = time.perf_counter() - t_loop >= limit
        if self.acc.num_processes == 1:
            return up
        if not log_step:
            return False
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([up])[0])

    def _weights(self):
        """Everything a checkpoint stores as weights: model, objective state, EMA."""
        yield from self.model.state_dict().values()
        yield from trained_state(self.objective).values()
        if self.ema is not None:
            yield from self.ema.state_dict().values()

    def _flush(self, window, window_logs, grad_norms, timer, pbar) -> float:
        """Check and log the steps since the last flush (one host sync); on a divergence, point
        ``latest`` at the newest vetted checkpoint and raise :class:`DivergedError`."""
        if not window:
            return self.losses[-1] if self.losses else float("nan")
        n = len(window)
        # under FSDP each process checks its shard of the weights: the flag is averaged with the losses
        weights_ok = all_finite(local_shard(t) for t in self._weights())
        local = torch.cat([torch.stack(window).float(), weights_ok.float().view(1).to(window[0].device)])
        reduced = self.acc.reduce(local, reduction="mean")
        losses, weights_ok = reduced[:n], reduced[n] == 1
        norms = torch.stack(grad_norms).float()
        packed = torch.cat([losses.float(), norms.to(losses.device), weights_ok.float().view(1)]).cpu()
        values, norm_values = packed[:n].tolist(), packed[n:2 * n].tolist()
        first = self.step - n + 1
        verdict = self.health.check(first, values, norm_values, weights_finite=bool(packed[-1]))
        if self.vetting is not None:
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
        img_s = timer[1] * self.cfg.batch_size * self.cfg.grad_accum / dt
        record = {"step": self.step}
        if self._uses_loader:
            record["epoch"] = self.plan.position(self.step * self.cfg.grad_accum)[0]
        # float(): a capturable optimizer's lr is a device tensor (one sync here, at a log step)
        record.update({"loss": mean_loss, "lr": float(self.sched.get_last_lr()[0]), "it_per_s": timer[1] / dt,
                       "img_per_s": img_s, "grad_norm": sum(norm_values) / n})
        if verdict.skipped:
            record["skipped_steps"] = len(verdict.skipped)
        for k, vs in window_logs.items():
            record[k] = self.acc.reduce(torch.stack(vs), reduction="mean").mean().item()
        flops = getattr(self.model, "flops_per_image", None)
        if flops is not None:
            tflops = 3.0 * flops() * img_s / 1e12  # backward = 2x forward
            record["tflops"] = tflops
            if self.device.type == "cuda":
                record["mfu"] = tflops / (self.cfg.peak_tflops * self.acc.num_processes)
        if self.device.type == "cuda":  # this process's peak, e.g. to compare FSDP with DDP
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.write(record)
        if pbar is not None:
            pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.0f}")
        return mean_loss

    def _stop(self, verdict: Verdict, values: list[float]) -> None:
        """Fall back to the newest vetted checkpoint and raise with a message that names it."""
        error = NonFiniteLossError if verdict.stop_kind == "nonfinite_loss" else DivergedError
        hint = "Try a lower trainer.lr or trainer.grad_clip."
        if self.vetting is None:
            raise error(f"{verdict.reason}: stopping (this run writes no checkpoints). {hint}")
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
        msg = f"{verdict.reason}: stopping. Nothing was written after that step. {where} {hint}"
        event = {"step": verdict.stop_step, "event": verdict.stop_kind,
                 "vetted": str(vetted) if vetted is not None else None}
        if verdict.stop_kind == "nonfinite_loss":
            event["loss"] = str(values[verdict.stop_step - verdict.first_step])
        self.metrics.write(event)
        raise error(msg)

    # ------------------------------------------------------------------ previews and evaluation
    def ema_model(self) -> nn.Module:
        """A copy of the model holding the EMA weights (the model's own without EMA), in eval mode;
        unsharded under FSDP (gathering them is collective: call on every process)."""
        if self._ema_model is None:
            self._ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        weights = self.ema.state_dict() if self.ema is not None else self.model.state_dict()
        self._ema_model.load_state_dict(full_state(weights))
        return self._ema_model

    def preview(self) -> Path | None:
        """``objective.preview`` of the EMA model into ``<run>/samples`` (main process)."""
        path = None
        ema_model = self.ema_model()  # every process: under FSDP the weights are gathered
        if self.is_main:
            path = self.objective.preview(ema_model, self.step, self.out_dir / "samples")
        self.acc.wait_for_everyone()
        return path

    def evaluate(self) -> dict:
        """``objective.evaluate`` of the EMA model on every process; logged as ``eval/<key>``."""
        numbers = {k: float(v) for k, v in self.objective.evaluate(self.ema_model(), self.step).items()}
        self.metrics.write({"step": self.step, **{f"eval/{k}": v for k, v in numbers.items()}})
        return {"step": self.step, **numbers}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_config(self) -> dict:
        config = dict(self.run_config)
        config["checkpoint"] = self.objective.checkpoint_meta(self.step)
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
        torch.save(capture_rng(self.generator), state / f"rng_{self.acc.process_index}.pt")
        # full tensors whatever the sharding (under FSDP gathered by every process, kept by the main one)
        main = self.is_main
        model_state = full_state(self.model.state_dict(), main)
        ema_state = full_state(self.ema.state_dict(), main) if self.ema is not None else model_state
        objective_state = full_state(trained_state(self.objective), main)
        optimizer_state = full_optimizer_state(self.opt.optimizer, main)
        if main:
            ckpt_io.save_weights(tmp / ckpt_io.MODEL_FILE, model_state)
            ckpt_io.save_weights(tmp / ckpt_io.EMA_FILE, ema_state)
            if objective_state:
                ckpt_io.save_weights(state / OBJECTIVE_STATE, objective_state)
            torch.save(optimizer_state, state / "optimizer.pt")
            torch.save(self.sched.state_dict(), state / "scheduler.pt")
            consumed = self.step * self.cfg.grad_accum
            epoch, batch = self.plan.position(consumed) if self.plan is not None else (None, None)
            trainer_state = {"step": self.step, "batches_consumed": consumed, "epoch": epoch,
                             "batch_in_epoch": batch, "ema_updates": self.ema.num_updates if self.ema else 0,
                             "global_batch": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                             "world_size": self.acc.num_processes, "seed": self.cfg.seed,
                             "noise": "global_batch" if self.objective.global_batch_noise else "per_process",
                             "data_parallel": self._data_parallel(),
                             "objective": type(self.objective).__name__, "trainer": asdict(self.cfg)}
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

    def _restore_rng(self, path: Path, saved_world: int) -> None:
        """This process's RNG state from ``state/rng_<rank>.pt``.

        Resuming on another number of processes: the data order is a function of the global batch
        index alone (:mod:`.state`). With ``global_batch_noise`` the noise stream is one stream
        (alike on every process when saved) and every process continues it from ``rng_0.pt``, so
        the resumed run draws what an uninterrupted run draws, on any number of processes. What
        stays per process is the global RNG (python / numpy / torch; e.g. the DiT's label dropout):
        a rank without a file of its own is seeded from (seed, rank, step)."""
        state, rank = path / ckpt_io.STATE_DIR, self.acc.process_index
        own = state / f"rng_{rank}.pt"
        if own.is_file():
            restore_rng(ckpt_io.torch_load(own), self.generator)
        else:
            torch.manual_seed(self.cfg.seed + rank + 7_919 * self.step)
            if saved_world == self.acc.num_processes:
                log.warning("%s has no %s (deleted?): the RNG of rank %d is seeded afresh", path,
                            own.relative_to(path), rank)
        shared = self.objective.global_batch_noise
        if shared and rank != 0:
            main_rng = ckpt_io.torch_load(ckpt_io.require_file(path, f"{ckpt_io.STATE_DIR}/rng_0.pt"))
            self.generator.set_state(main_rng["noise"])
        if saved_world != self.acc.num_processes and self.is_main:
            if shared:
                log.info("%s was written by %d processes, this run has %d: same data order and noise stream; "
                         "the global RNG of processes without an rng_<rank>.pt is seeded afresh", path,
                         saved_world, self.acc.num_processes)
            else:
                log.warning("%s was written by %d processes, this run has %d: same data order, but %s draws "
                            "its noise per process, so the noise of the resumed steps differs from an "
                            "uninterrupted run", path, saved_world, self.acc.num_processes,
                            type(self.objective).__name__)

    def _before_commit(self, tmp: Path) -> None:
        """Called with the complete temporary directory just before the atomic rename (tests
        simulate a crash here)."""

    def _load(self, path: Path) -> None:
        """Restore weights, EMA, objective state, optimizer, scheduler, step, data position, RNG."""
        meta = ckpt_io.read_json(ckpt_io.require_file(path, f"{ckpt_io.STATE_DIR}/trainer.json"))
        # checkpoints of the DiT trainer before the engine lack grad_accum and optimizer: it used 1, AdamW
        for key, ours, what in (("global_batch", self.cfg.batch_size, "trainer.batch_size"),
                                ("grad_accum", self.cfg.grad_accum, "trainer.grad_accum")):
            theirs = meta.get(key, 1 if key == "grad_accum" else None)
            if theirs != ours:
                raise ckpt_io.CheckpointError(
                    f"{path} was trained with {key.replace('_', ' ')} {theirs}, this run uses {ours}: the "
                    f"data order would differ; set {what} to match")
        saved_optimizer = (meta.get("trainer") or {}).get("optimizer", "adamw")
        if saved_optimizer != self.cfg.optimizer:
            raise ckpt_io.CheckpointError(
                f"{path} was trained with optimizer {saved_optimizer!r}, this run uses "
                f"{self.cfg.optimizer!r}: its state cannot carry over; set trainer.optimizer to match")
        # weight files are checked against the sha256 in config.yaml and for NaN/inf
        node = ckpt_io.checkpoint_node(ckpt_io.load_config(path), path / ckpt_io.CONFIG_FILE)
        # full tensors on disk; under FSDP each process keeps its shard (shard_like)
        model_state = ckpt_io.read_checkpoint_weights(path, ckpt_io.MODEL_FILE, node)
        self.model.load_state_dict(shard_like(model_state, self.model.state_dict()))
        name = f"{ckpt_io.STATE_DIR}/{OBJECTIVE_STATE}"
        if (path / name).is_file():
            objective_state = ckpt_io.read_checkpoint_weights(path, name, node)
            load_trained_state(self.objective, shard_like(objective_state, self.objective.state_dict()),
                               path / name)
        elif trained_state(self.objective):
            raise ckpt_io.CheckpointError(f"{path} has no {name}, but this objective "
                                          f"({type(self.objective).__name__}) has trained state")
        if self.ema is not None:
            ema_state = ckpt_io.read_checkpoint_weights(path, ckpt_io.EMA_FILE, node)
            self.ema.load_state_dict(shard_like(ema_state, self.ema.state_dict()), meta["ema_updates"])
        optimizer_state = ckpt_io.torch_load(ckpt_io.require_file(path, "state/optimizer.pt"))
        self.opt.load_state_dict(shard_optimizer_state(self.opt.optimizer, optimizer_state))
        self.sched.load_state_dict(ckpt_io.torch_load(ckpt_io.require_file(path, "state/scheduler.pt")))
        self.step = int(meta["step"])
        self._restore_rng(path, int(meta.get("world_size", 1)))
        self.last_checkpoint = path
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)
