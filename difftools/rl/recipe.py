"""The DiffusionNFT recipe without Hydra: a conf/nft.yaml mapping -> objective + engine config -> run.

``train/nft.py`` is the command line over :func:`run_nft`; ``scripts/nft_gpu.py`` calls it for its
sweep. The mapping's keys are documented in conf/nft.yaml; :func:`trainer_config` says how they
become :class:`~difftools.training.TrainerConfig` options (sizes per iteration become steps).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from difftools import checkpoint as ckpt_io
from difftools.checkpoint import EMA_FILE, MODEL_FILE, CheckpointError, load, weights_sha256
from difftools.models.lora import LoRADiT
from difftools.process import Flow
from difftools.rl import rewards
from difftools.rl.evaluation import BestSelection, HeldOutEval
from difftools.rl.nft import NFTLoss, old_schedule, shifted_times
from difftools.rl.objective import Collection, NFTObjective, check_resume
from difftools.rl.safeguards import RunawayGuard
from difftools.training import DivergedError, Trainer, TrainerConfig
from difftools.training.trainer import make_accelerator
from samplers.schedules import get_times

log = logging.getLogger("difftools.rl")

REWARD_KEYS = {"classifier": ("classifier", "log_prob", "quantize"), "brightness": ("target",)}
TIME_SOURCES = ("shifted", "sampler", "uniform")
#: the released code's learning rates: 3e-4 for its LoRA adapters; full fine-tuning moves every
#: weight of the network and takes a smaller one (issue 15: 3e-4 moved a full DiT by
#: mean (v_theta - v_base)^2 = 0.032 in one iteration)
DEFAULT_LR = {"full": 1e-4, "lora": 3e-4}
#: settings a resumed checkpoint must share with the run (they shape the samples and the updates)
RESUME_KEYS = ("seed", "groups", "group_size", "group_by", "train_batch", "inner_epochs", "updates_per_epoch")


@dataclass
class NFTResult:
    iteration: int
    losses: list[float] = field(default_factory=list)  #: mean loss of each iteration run by this call
    checkpoint: Path | None = None
    grid: Path | None = None
    evaluations: list[dict] = field(default_factory=list)  #: held-out evaluations of this call
    best: dict | None = None  #: the best held-out evaluation (step, judge_accuracy, fd)
    stopped_by: str = "max_steps"
    seconds: float = 0.0


def load_base(path, weights: str = "ema", device="cpu"):
    """The base checkpoint (``difftools.load``), refused unless it is a flow-matching model."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"base_weights must be 'ema' or 'raw', got {weights!r}")
    try:
        loaded = load(path, use_ema=weights == "ema", device=device)
    except CheckpointError as err:
        raise FileNotFoundError(
            f"base checkpoint {path!r} cannot be loaded ({err}). DiffusionNFT fine-tunes a trained flow DiT: "
            "make one with `python train/dit.py` (~3.5 min on CPU, writes runs/dit/<date>) and pass "
            "base=runs/dit/<date>"
        ) from None
    if not isinstance(loaded.process, Flow) or loaded.prediction != "flow":
        # NFT's implicit policies mix velocities; other parameterisations would silently reweight
        # the loss over t, so they are refused rather than converted (docs/nft.md)
        raise ValueError(
            f"base checkpoint {loaded.path} was trained with process {loaded.process!r} and prediction "
            f"{loaded.prediction!r}; DiffusionNFT here needs a rectified-flow base (process Flow, prediction "
            "'flow'): train one with `python train/dit.py process=flow`"
        )
    return loaded


def as_config(cfg) -> DictConfig:
    """A resolved, struct-mode copy (a misspelt key is an error, not a silent None)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    if OmegaConf.is_missing(cfg, "base") or not cfg.base:
        raise ValueError(
            "base=<checkpoint or run dir> is required: the flow DiT to fine-tune (make one "
            "with `python train/dit.py`, ~3.5 min on CPU, then base=runs/dit/<date>)"
        )
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    out = OmegaConf.create(plain)
    OmegaConf.set_struct(out, True)
    if out.reward not in REWARD_KEYS:
        raise ValueError(f"unknown reward {out.reward!r}; expected one of {sorted(REWARD_KEYS)}")
    if out.device not in ("auto", "cpu"):
        raise ValueError(f"device must be 'auto' or 'cpu', got {out.device!r}")
    return out


def collection_of(cfg: DictConfig) -> Collection:
    return Collection(
        groups=int(cfg.groups),
        group_size=int(cfg.group_size),
        train_batch=int(cfg.train_batch),
        inner_epochs=int(cfg.inner_epochs),
        seed=int(cfg.seed),
        collect_batch=int(cfg.collect_batch),
        group_by=str(cfg.group_by),
        sampler=OmegaConf.to_container(cfg.sampler),
    )


def grad_accum_of(cfg: DictConfig, collection: Collection) -> int:
    """Micro-batches per optimizer step: one pass over the collection makes ``updates_per_epoch`` steps
    (1 = gradient accumulation over the whole collection, the released code's setting)."""
    per_epoch = collection.micro_batches_per_epoch
    if cfg.updates_per_epoch is None:  # one optimizer step per micro-batch
        return 1
    updates = int(cfg.updates_per_epoch)
    if updates < 1 or per_epoch % updates:
        raise ValueError(
            f"updates_per_epoch = {updates} must be >= 1 and divide the {per_epoch} micro-batches of "
            f"one pass ({collection.num_samples} samples / train_batch {collection.train_batch})"
        )
    return per_epoch // updates


def learning_rate(cfg: DictConfig) -> float:
    if cfg.optim.lr is not None:
        return float(cfg.optim.lr)
    return DEFAULT_LR["lora" if cfg.lora.enabled else "full"]


def trainer_config(cfg: DictConfig, collection: Collection):
    """The engine options: one optimizer step = ``grad_accum`` micro-batches of ``train_batch``;
    ``iterations``, ``ckpt_every``, ``sample_every`` and ``eval.every`` (in iterations) become steps;
    one log record per iteration; AdamW without warm-up or decay (the released code's optimizer)."""
    accum = grad_accum_of(cfg, collection)
    steps = collection.micro_batches // accum  # optimizer steps per iteration
    return TrainerConfig.from_dict(
        {
            "batch_size": collection.train_batch,
            "grad_accum": accum,
            "max_steps": int(cfg.iterations) * steps,
            "time_limit": cfg.time_limit,
            "optimizer": "adamw",
            "lr": learning_rate(cfg),
            "warmup_steps": 0,
            "lr_decay": "constant",
            "weight_decay": float(cfg.optim.weight_decay),
            "betas": [float(b) for b in cfg.optim.betas],
            "grad_clip": float(cfg.optim.grad_clip),
            "ema_decay": float(cfg.ema.decay),
            "ema_warmup": bool(cfg.ema.warmup),
            "mixed_precision": cfg.mixed_precision,
            "device": cfg.device,
            "seed": int(cfg.seed),
            "log_every": steps,
            "ckpt_every": int(cfg.ckpt_every) * steps,
            "keep_last": int(cfg.keep_last),
            "eval_every": int(cfg.eval.every) * steps,
            "sample_every": int(cfg.sample_every) * steps,
            "progress": bool(cfg.progress),
            "cpu_threads": cfg.cpu_threads,
            "resume": cfg.resume,
        }
    )


def training_times(cfg: DictConfig, process):
    """The time grid the loss draws from (None = uniform): the shifted schedule, or the collection
    solver's own evaluation times."""
    source = cfg.loss.times
    if source not in TIME_SOURCES:
        raise ValueError(f"loss.times must be one of {TIME_SOURCES}, got {source!r}")
    if source == "shifted":
        return shifted_times(int(cfg.loss.time_steps), float(cfg.loss.shift))
    if source == "sampler":
        s = cfg.sampler
        return get_times(process, s.schedule, int(s.steps), 1.0, float(s.t_end))[:-1]
    return None


def build_reward(cfg: DictConfig, dataset_info):
    opts = {k: cfg.reward_opts[k] for k in REWARD_KEYS[cfg.reward] if k in cfg.reward_opts}
    return rewards.build_reward(cfg.reward, dataset_info, **opts)


def build_policy(cfg: DictConfig, base_model):
    """The trained network: the base DiT itself (full fine-tuning) or a LoRA-adapted copy."""
    if not cfg.lora.enabled:
        base_model.requires_grad_(True)
        return base_model, "copy"
    torch.manual_seed(int(cfg.seed))  # the adapters' A is drawn at random (B = 0)
    model = LoRADiT(
        base_model, rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha), targets=list(cfg.lora.targets)
    )
    return model, "adapters"


def build_evaluator(cfg: DictConfig, loaded, device):
    e = cfg.eval
    if int(e.every) <= 0:
        return None
    missing = [k for k in ("judge", "reference") if not e[k]]
    if missing:
        raise ValueError(
            f"eval.every={e.every} needs eval.{' and eval.'.join(missing)}: a judge classifier "
            "checkpoint never used for training and the reference statistics (.npz) of the real "
            "data in the eval.features space (see docs/nft.md)"
        )
    reward_clf = cfg.reward_opts.classifier if cfg.reward == "classifier" else None
    return HeldOutEval(
        e.judge,
        e.features or e.judge,
        e.reference,
        process=loaded.process,
        prediction=loaded.prediction,
        num_classes=int(getattr(loaded.model, "num_classes", 0) or 0),
        n=int(e.n),
        seed=int(e.seed),
        sampler=OmegaConf.to_container(cfg.sampler),
        autoencoder=loaded.autoencoder,
        reward=reward_clf or None,
        batch=int(e.batch),
        device=device,
    )


@dataclass
class NFTRun:
    """Everything :func:`run_nft` builds before training."""

    objective: NFTObjective
    trainer_config: object
    run_config: dict
    accelerator: object
    collection: Collection

    @property
    def steps_per_iteration(self) -> int:
        return self.collection.micro_batches // self.trainer_config.grad_accum


def build_nft(cfg, accelerator=None) -> NFTRun:
    """Load the base, build the reward, the policy, the loss and the objective (nothing trains yet)."""
    cfg = as_config(cfg)
    collection = collection_of(cfg)
    tcfg = trainer_config(cfg, collection)
    acc = accelerator or make_accelerator(tcfg)
    collection.check(acc.num_processes)
    if acc.device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(int(cfg.cpu_threads))
    base = load_base(cfg.base, cfg.base_weights)
    base_sha = weights_sha256(base.path, EMA_FILE if cfg.base_weights == "ema" else MODEL_FILE)
    reward = build_reward(cfg, base.dataset_info)
    loss = NFTLoss(
        base.process,
        beta=float(cfg.loss.beta),
        form=cfg.loss.form,
        ref_weight=float(cfg.loss.ref_weight),
        times=training_times(cfg, base.process),
        t_per_sample=cfg.loss.t_per_sample,
        t_min=float(cfg.loss.t_min),
        t_max=float(cfg.loss.t_max),
        t_floor=float(cfg.loss.t_floor),
        policy_scale=float(cfg.loss.policy_scale),
    )
    g = cfg.guard
    guard = RunawayGuard(
        g.max_ref_deviation, g.max_x0_norm_ratio, g.action, float(g.kl_factor), float(g.max_ref_weight)
    )
    model, reference = build_policy(cfg, base.model)
    needs_ref = loss.ref_weight > 0 or guard.active
    run_config = OmegaConf.to_container(cfg, resolve=True)
    # the base run's data node lets evaluation find non-embedded datasets (data.root)
    run_config["data"] = base.config.get("data")
    run_config["base_checkpoint"] = {"path": str(base.path), "weights_sha256": base_sha}
    objective = NFTObjective(
        model,
        base.process,
        base.prediction,
        loss,
        reward,
        collection,
        old_schedule=old_schedule(cfg.old.schedule, cfg.old.rate, cfg.old.cap, cfg.old.flat),
        adv_clip=float(cfg.loss.adv_clip),
        std_floor=float(cfg.loss.std_floor),
        reference=reference if needs_ref else "none",
        guard=guard,
        evaluator=build_evaluator(cfg, base, acc.device),
        selection=BestSelection(cfg.eval.select, cfg.eval.fd_tolerance),
        autoencoder=base.autoencoder,
        dataset_info=base.dataset_info,
        grid_num=int(cfg.sample_num),
        run_config=run_config,
        resume_settings={k: cfg[k] for k in RESUME_KEYS},
        base_sha=base_sha,
    )
    run = NFTRun(objective, tcfg, run_config, acc, collection)
    if acc.is_main_process:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "base %s (%s weights); %s: %.3fM trained params; %d samples per iteration = %d groups x %d over "
            "%d device(s) = %d per device; train batch %d global = %d per device, %d micro-batches per "
            "optimizer step, %d optimizer step(s) per iteration; lr %g",
            base.path,
            cfg.base_weights,
            "LoRA" if cfg.lora.enabled else "full fine-tuning",
            n_train / 1e6,
            collection.num_samples,
            collection.groups,
            collection.group_size,
            acc.num_processes,
            collection.num_samples // acc.num_processes,
            collection.train_batch,
            collection.train_batch // acc.num_processes,
            tcfg.grad_accum,
            run.steps_per_iteration,
            tcfg.lr,
        )
    return run


def resume_path(cfg: DictConfig, out_dir: Path) -> Path | None:
    """The checkpoint ``resume`` names (as the engine resolves it), or None."""
    r = cfg.resume
    if not r:
        return None
    if str(r) == "auto":
        root = out_dir / "checkpoints"
        return ckpt_io.read_latest(root) if root.is_dir() else None
    return ckpt_io.resolve_checkpoint(r)


def run_nft(cfg, out_dir, accelerator=None) -> NFTResult:
    """Fine-tune as configured; returns the final iteration, per-iteration losses and paths."""
    run = build_nft(cfg, accelerator)
    out_dir = Path(out_dir)
    cfg = as_config(cfg)
    resumed = resume_path(cfg, out_dir)
    if resumed is not None and resumed.is_dir():
        # before the engine's own checks, so that the message names the NFT setting that differs
        check_resume(resumed, run.objective.resume_settings, run.objective.base_sha)
    trainer = Trainer(
        run.objective, run.trainer_config, out_dir, run_config=run.run_config, accelerator=run.accelerator
    )
    try:
        result = trainer.train()
    except DivergedError as err:
        raise type(err)(
            f"{err} (NFT: a step is one optimizer step, {run.steps_per_iteration} per iteration; "
            "in conf/nft.yaml the knobs are optim.lr, optim.grad_clip and a larger loss.beta)"
        ) from None
    s = run.steps_per_iteration
    losses = [
        sum(result.losses[i : i + s]) / len(result.losses[i : i + s]) for i in range(0, len(result.losses), s)
    ]
    evaluations = [e for e in result.evaluations if len(e) > 1]
    return NFTResult(
        iteration=result.step // s,
        losses=losses,
        checkpoint=result.checkpoint,
        grid=result.grid,
        evaluations=evaluations,
        best=copy.deepcopy(run.objective.best),
        stopped_by=result.stopped_by,
        seconds=result.seconds,
    )
