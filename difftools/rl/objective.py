"""DiffusionNFT on the training engine: :class:`NFTObjective` (an :class:`~difftools.training.Objective`).

The engine (:class:`difftools.training.Trainer`) runs the optimisation -- AdamW, gradient
accumulation, clipping, EMA, checkpoints, exact resume, the NaN stop, logging -- and this objective
supplies the data and the loss. Iteration k (M micro-batches of ``train_batch`` samples; the engine
accumulates ``grad_accum`` of them per optimizer step, S = M / grad_accum steps per iteration):

1. :meth:`NFTObjective.batches` collects ``groups x group_size`` samples with the old policy
   (no guidance; sample i starts from noise seeded by (seed, k N + i), its label from
   :func:`iteration_labels`), rewards them, gathers the rewards over devices and turns them into
   advantages per label group (global std) and optimality weights r. It then draws, per inner
   epoch, a permutation of the samples and their training times and noise, from generators seeded
   by (seed, k, rank, epoch), and yields the micro-batches. Everything is a pure function of
   (seed, k, rank) and the old policy, so a resumed run re-collects the same iteration.
2. :meth:`NFTObjective.forward` is the NFT loss (:class:`difftools.rl.nft.NFTLoss`) of one micro-batch.
3. :meth:`NFTObjective.after_step`, at the iteration's last optimizer step: the soft old-policy
   update with d = old_decay(step), the runaway guard (:mod:`difftools.rl.safeguards`) and the
   iteration's statistics as logs (one ``metrics.jsonl`` record per iteration when ``log_every``
   = S).

The old policy is a frozen helper saved through :meth:`extra_state` (with the reference weight a
guard may have raised, the first iteration's x0 norm and the best held-out evaluation). The
reference is a frozen copy of the base, or for a :class:`~difftools.models.lora.LoRADiT` the
model itself with its adapters off. :meth:`evaluate` is the held-out evaluation
(:mod:`difftools.rl.evaluation`); the best evaluation's EMA weights are written to ``<run>/best``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from difftools import checkpoint as ckpt_io
from difftools.rl.evaluation import BestSelection, HeldOutEval
from difftools.rl.nft import NFTLoss, group_advantages, old_decay, optimality_weights, soft_update
from difftools.rl.rewards import Reward
from difftools.rl.safeguards import RunawayGuard
from difftools.rl.sampling import sample_policy
from difftools.training import Objective, RunInfo
from difftools.training.grid import sample_images, save_grid

log = logging.getLogger("difftools.rl")

REFERENCES = ("copy", "adapters", "none")
GROUP_BY = ("label", "slot")


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of ints (numpy SeedSequence: distinct tuples never collide in practice)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def iteration_labels(seed: int, iteration: int, groups: int, num_classes: int) -> torch.Tensor:
    """[groups] labels of iteration k: consecutive shuffled cycles through the classes (balanced)."""
    if not num_classes:
        return torch.zeros(groups, dtype=torch.long)
    rng = np.random.default_rng([int(seed), int(iteration), 7])
    cycles = -(-groups // num_classes)
    return torch.as_tensor(np.concatenate([rng.permutation(num_classes) for _ in range(cycles)])[:groups])


@dataclass(frozen=True)
class Collection:
    """What one iteration collects and how it is cut into micro-batches (all sizes GLOBAL).

    Attributes:
        groups, group_size: ``groups`` label slots of ``group_size`` samples each.
        train_batch: samples in one micro-batch (one forward pass) over all devices.
        inner_epochs: passes over the collected samples per iteration.
        seed: seeds the labels, the collection noise and the training draws.
        collect_batch: per-device sampling chunk (memory only; results do not depend on it).
        group_by: ``label`` (the released code: a group is every sample of one prompt / label) or
            ``slot`` (each of the ``groups`` slots on its own, even when two slots share a label).
        sampler: the old policy's solver (:func:`difftools.rl.sampling.sample_policy`).
    """

    groups: int
    group_size: int
    train_batch: int
    inner_epochs: int = 1
    seed: int = 0
    collect_batch: int = 256
    group_by: str = "label"
    sampler: Mapping = field(
        default_factory=lambda: {
            "solver": "dpmpp_2m",
            "steps": 10,
            "schedule": "logsnr",
            "t_end": 1e-3,
            "opts": {},
        }
    )

    @property
    def num_samples(self) -> int:
        return self.groups * self.group_size

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.num_samples // self.train_batch

    @property
    def micro_batches(self) -> int:
        """M: micro-batches per iteration."""
        return self.inner_epochs * self.micro_batches_per_epoch

    def check(self, world_size: int) -> None:
        n, b, w = self.num_samples, self.train_batch, world_size
        if self.groups < 1 or self.group_size < 2:
            raise ValueError(
                f"need groups >= 1 and group_size >= 2 (advantages are centred per group); got "
                f"groups={self.groups}, group_size={self.group_size}"
            )
        if self.inner_epochs < 1:
            raise ValueError(f"inner_epochs must be >= 1, got {self.inner_epochs}")
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {GROUP_BY}, got {self.group_by!r}")
        if n % w or b % w:
            raise ValueError(
                f"groups x group_size = {n} samples and train_batch = {b} must both be divisible "
                f"by the world size {w}; per-device sizes are derived from these global ones"
            )
        if b < 1 or n % b:
            raise ValueError(
                f"train_batch = {b} must divide the {n} samples of an iteration (groups x group_size)"
            )


def check_resume(path: str | Path, settings: Mapping, base_sha: str | None) -> None:
    """Refuse to resume checkpoint ``path`` when a setting that shapes the collected samples or the
    updates differs, or when it fine-tunes other base weights (CheckpointError naming both)."""
    config = ckpt_io.load_config(path)
    for key, ours in settings.items():
        theirs = config.get(key)
        if theirs != ours:
            raise ckpt_io.CheckpointError(
                f"{path} was written with {key}={theirs}, this run has {key}={ours}: the collected samples "
                f"and updates would differ from the interrupted run; set {key}={theirs}"
            )
    base = config.get("base_checkpoint") or {}
    if base_sha is not None and base.get("weights_sha256") != base_sha:
        raise ckpt_io.CheckpointError(
            f"{path} fine-tunes base {base.get('path')} (weights sha256 "
            f"{str(base.get('weights_sha256'))[:12]}), but this run's base has sha256 {base_sha[:12]}: the "
            "reference model would differ"
        )


class _AdaptersOff:
    """The reference velocity of a LoRA policy: the same network with its adapters disabled."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.adapters_disabled():
            return self.model(*args, **kwargs)


class _Iteration:
    """Collected samples of one iteration on this device, with their rewards and training draws."""

    def __init__(self, x0, labels, r, stats):
        self.x0, self.labels, self.r, self.stats = x0, labels, r, stats
        self.epochs: dict[int, tuple] = {}


class NFTObjective(Objective):
    """DiffusionNFT as an engine objective (module docstring).

    Args:
        model: the policy (a DiT, or a :class:`~difftools.models.lora.LoRADiT`), initialised at the base.
        process, prediction: the base's (a rectified flow with ``flow`` prediction).
        loss: the NFT loss (beta, form, training times, reference weight).
        reward: the reward model; its classifier (if any) becomes a frozen helper.
        collection: :class:`Collection`.
        old_schedule: (rate, cap, flat) of :func:`difftools.rl.nft.old_decay`.
        adv_clip, std_floor: :func:`optimality_weights` clip, :func:`group_advantages` std floor.
        reference: ``copy`` (a frozen copy of the base), ``adapters`` (LoRA: the model with adapters
            off) or ``none`` (no reference: ``loss.ref_weight`` must be 0 and no guard may need it).
        guard: a :class:`RunawayGuard` (None = off).
        evaluator, selection: held-out evaluation and the best-checkpoint rule (None = off).
        autoencoder, dataset_info: the base's (for decoding and the checkpoint).
        grid_num: images in a preview grid (0 = none).
        run_config: the run's config (written with the best checkpoint).
        resume_settings: settings a resumed checkpoint must share (see :func:`check_resume`).
        base_sha: sha256 of the base weights (checked on resume).
    """

    kind = "dit"

    def __init__(
        self,
        model: nn.Module,
        process,
        prediction: str,
        loss: NFTLoss,
        reward: Reward,
        collection: Collection,
        *,
        old_schedule=(0.001, 0.5, 0),
        adv_clip: float = 5.0,
        std_floor: float = 0.0,
        reference: str = "copy",
        guard: RunawayGuard | None = None,
        evaluator: HeldOutEval | None = None,
        selection: BestSelection | None = None,
        autoencoder=None,
        dataset_info=None,
        grid_num: int = 100,
        run_config: Mapping | None = None,
        resume_settings: Mapping | None = None,
        base_sha: str | None = None,
    ):
        super().__init__(model)
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        guard = guard if guard is not None and guard.active else None
        if reference == "none" and (loss.ref_weight > 0 or (guard is not None and guard.needs_reference)):
            raise ValueError("loss.ref_weight > 0 and guard.max_ref_deviation need a reference model")
        if reference == "adapters" and not hasattr(model, "adapters_disabled"):
            raise ValueError("reference='adapters' needs a LoRA model (LoRADiT)")
        if guard is not None and guard.action == "raise_kl" and loss.ref_weight <= 0:
            raise ValueError("guard.action=raise_kl raises loss.ref_weight, which must then start > 0")
        self.process, self.prediction, self.loss, self.reward = process, prediction, loss, reward
        self.collection, self.old_schedule = collection, tuple(old_schedule)
        self.adv_clip, self.std_floor, self.reference = float(adv_clip), float(std_floor), reference
        self.guard, self.evaluator = guard, evaluator
        self.selection = selection or BestSelection()
        self.dataset_info = ckpt_io._plain(dataset_info) if dataset_info is not None else None
        self.grid_num, self.run_config = int(grid_num), dict(run_config or {})
        self.resume_settings, self.base_sha = dict(resume_settings or {}), base_sha
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.register_frozen("old", copy.deepcopy(model))
        self.register_frozen("ref", copy.deepcopy(model) if reference == "copy" else None)
        self.register_frozen("reward_net", getattr(reward, "net", None))
        self.register_frozen("autoencoder", autoencoder)
        self.run: RunInfo | None = None
        self.steps_per_iteration = 0
        self.x0_norm_start = math.nan
        self.fd_base: float | None = None
        self.best: dict | None = None
        self.history: list[dict] = []
        self._current: _Iteration | None = None
        self._ref_dev: list[torch.Tensor] = []

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> NFTObjective:
        """The policy stays in eval mode: no label dropout, so the null class is never trained on
        reward-weighted data (NFT trains the conditional model; sampling is CFG-free)."""
        super().train(mode)
        self.model.eval()
        return self

    # ------------------------------------------------------------------ start
    def on_start(self, run: RunInfo, resumed_from: Path | None) -> None:
        c = self.collection
        c.check(run.world_size)
        if run.config.batch_size != c.train_batch:
            raise ValueError(
                f"trainer batch_size {run.config.batch_size} must equal the collection's "
                f"train_batch {c.train_batch}"
            )
        if c.micro_batches % run.config.grad_accum:
            raise ValueError(
                f"grad_accum {run.config.grad_accum} must divide the {c.micro_batches} micro-batches "
                "of an iteration"
            )
        self.run = run
        self.steps_per_iteration = c.micro_batches // run.config.grad_accum
        if resumed_from is not None:
            check_resume(resumed_from, self.resume_settings, self.base_sha)
            self._read_history(resumed_from)
            return
        if run.is_main and run.out_dir is not None and self.grid_num > 0:
            self.preview(self.model, 0, run.out_dir / "samples")  # the base: the "before" picture
        if self.evaluator is not None and run.is_main:
            record = self._measure(self.model, 0)
            self.fd_base = float(record["fd"])
            self._write_history()
            log.info("held-out evaluation of the base: %s", _short(record))

    # ------------------------------------------------------------------ data
    def batches(self, start: int, run: RunInfo) -> Iterator[dict]:
        m = self.collection.micro_batches
        first, offset = divmod(start, m)

        def micro_batches():
            k, j0 = first, offset
            while True:
                self._current = self.collect(k)
                for j in range(j0, m):
                    yield self.micro_batch(self._current, k, j)
                k, j0 = k + 1, 0

        return micro_batches()

    def _local(self) -> range:
        n_local = self.collection.num_samples // self.run.world_size
        return range(self.run.rank * n_local, (self.run.rank + 1) * n_local)

    @torch.no_grad()
    def collect(self, k: int) -> _Iteration:
        """Iteration k's samples on this device: x0, labels, r, and the iteration's statistics."""
        run, c, acc = self.run, self.collection, self.run.accelerator
        t0 = time.perf_counter()
        mine = list(self._local())
        labels_all = iteration_labels(c.seed, k, c.groups, self.num_classes).repeat_interleave(c.group_size)
        labels = labels_all[mine]
        x0, images = sample_policy(
            self.old,
            self.process,
            self.prediction,
            labels if self.num_classes else None,
            c.seed,
            [k * c.num_samples + i for i in mine],
            c.sampler,
            autoencoder=self.autoencoder,
            batch=c.collect_batch,
            device=run.device,
            autocast=acc.autocast,
        )
        rewards, reward_logs = self.reward.evaluate(
            images, labels.to(images.device) if self.num_classes else None
        )
        everyone = acc.gather(rewards.to(run.device).float().contiguous()).cpu()
        slots = torch.arange(c.groups).repeat_interleave(c.group_size)
        keys = labels_all if c.group_by == "label" else slots
        adv = group_advantages(everyone, keys, std_floor=self.std_floor)
        r_all = optimality_weights(adv, self.adv_clip).float()
        x0_norm = self._mean_over_devices((x0.float() ** 2).mean())
        stats = {
            "reward_mean": everyone.mean().item(),
            "reward_std": everyone.std(unbiased=False).item(),
            "reward_min": everyone.min().item(),
            "reward_max": everyone.max().item(),
            "r_mean": r_all.mean().item(),
            "adv_abs_mean": adv.abs().mean().item(),
            "zero_std_groups": _zero_std_groups(everyone, keys),
            "x0_norm": x0_norm,
            "brightness": self._mean_over_devices(((images + 1) / 2).mean()),
        }
        stats.update(
            {
                f"reward_{name}": self._mean_over_devices(torch.tensor(float(v)))
                for name, v in reward_logs.items()
            }
        )
        if k == 0:
            self.x0_norm_start = x0_norm  # the base's samples: the guard's x0-norm yardstick
        stats["collect_s"] = time.perf_counter() - t0
        return _Iteration(x0, labels.to(run.device), r_all[mine].to(run.device), stats)

    def _draws(self, it: _Iteration, k: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(permutation, t, eps) of one inner epoch, from generators seeded (seed, k, rank, epoch)."""
        if epoch not in it.epochs:
            keys = (self.collection.seed, k, self.run.rank, epoch)
            perm = torch.randperm(len(it.x0), generator=torch.Generator().manual_seed(derived_seed(*keys, 1)))
            gen = torch.Generator(device=it.x0.device).manual_seed(derived_seed(*keys, 2))
            t, eps = self.loss.draw(it.x0, gen)
            it.epochs = {epoch: (perm, t, eps)}  # one epoch at a time in memory
        return it.epochs[epoch]

    def micro_batch(self, it: _Iteration, k: int, j: int) -> dict:
        """Micro-batch j of iteration k: its samples, their r, times and noise (K rows per sample)."""
        per_epoch = self.collection.micro_batches_per_epoch
        epoch, jj = divmod(j, per_epoch)
        perm, t, eps = self._draws(it, k, epoch)
        b = len(it.x0) // per_epoch
        idx = perm[jj * b : (jj + 1) * b].to(it.x0.device)
        kk = self.loss.t_per_sample
        rows = (idx[:, None] * kk + torch.arange(kk, device=idx.device)).reshape(-1)
        batch = {"x0": it.x0[idx], "r": it.r[idx], "t": t[rows], "eps": eps[rows]}
        if self.num_classes:
            batch["y"] = it.labels[idx]
        return batch

    # ------------------------------------------------------------------ step
    def _reference(self):
        if self.reference == "copy":
            return self.ref
        if self.reference == "adapters":
            return _AdaptersOff(self.model)
        return None

    def forward(self, batch, generator):
        loss, logs = self.loss(
            self.model,
            self.old,
            batch["x0"],
            batch.get("y"),
            batch["r"],
            ref_model=self._reference(),
            t=batch["t"],
            eps=batch["eps"],
        )
        if "ref_deviation" in logs:
            self._ref_dev.append(logs["ref_deviation"])
        return loss, logs

    def after_step(self, step: int) -> Mapping:
        if step % self.steps_per_iteration:
            return {}
        k = step // self.steps_per_iteration  # iterations done
        d = old_decay(step, *self.old_schedule)  # by optimizer step, as the released code
        soft_update(self.old, self.model, d)
        logs = dict(self._current.stats) if self._current is not None else {}
        logs.update({"iteration": k, "old_decay": d, "ref_weight": self.loss.ref_weight})
        if self.guard is not None:
            ref_dev = None
            if self._ref_dev:
                ref_dev = self._mean_over_devices(torch.stack(self._ref_dev).float().mean())
            last = (
                ckpt_io.read_latest(self.run.out_dir / "checkpoints")
                if self.run.out_dir is not None
                else None
            )
            self.loss.ref_weight = self.guard.check(
                k,
                ref_dev,
                logs.get("x0_norm", math.nan),
                self.x0_norm_start,
                self.loss.ref_weight,
                str(last or "none yet"),
            )
        self._ref_dev = []
        return logs

    def _mean_over_devices(self, value: torch.Tensor) -> float:
        value = torch.as_tensor(value, dtype=torch.float32, device=self.run.device).reshape(1)
        return self.run.accelerator.reduce(value, reduction="mean").item()

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, torch.Tensor]:
        """The old policy (``old.<name>``), the reference weight (a guard may raise it) and, once known,
        the first iteration's x0 norm, the base's held-out fd and the best evaluation (step, judge
        accuracy, fd). Values that are not known yet are left out (the engine refuses NaN state)."""
        state = {f"old.{k}": v.detach().clone() for k, v in self.old.state_dict().items()}
        state["ref_weight"] = torch.tensor([self.loss.ref_weight], dtype=torch.float64)
        if math.isfinite(self.x0_norm_start):
            state["x0_norm_start"] = torch.tensor([self.x0_norm_start], dtype=torch.float64)
        if self.fd_base is not None and math.isfinite(self.fd_base):
            state["fd_base"] = torch.tensor([self.fd_base], dtype=torch.float64)
        if self.best is not None:
            state["best"] = torch.tensor(
                [self.best["step"], self.best["judge_accuracy"], self.best["fd"]], dtype=torch.float64
            )
        return state

    def load_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        old = {k[len("old.") :]: v for k, v in state.items() if k.startswith("old.")}
        if "ref_weight" not in state or not old:
            raise ckpt_io.CheckpointError(
                f"the checkpoint's NFT state lacks the old policy or the reference weight "
                f"(keys {sorted(state)[:5]}); was it written by this recipe?"
            )
        self.old.load_state_dict(old, strict=True)
        self.loss.ref_weight = float(state["ref_weight"][0])
        self.x0_norm_start = float(state["x0_norm_start"][0]) if "x0_norm_start" in state else math.nan
        self.fd_base = float(state["fd_base"][0]) if "fd_base" in state else None
        self.best = None
        if "best" in state:
            step, acc, fd_value = state["best"].tolist()
            self.best = {"step": int(step), "judge_accuracy": acc, "fd": fd_value}

    def _checkpoint_node(self) -> dict:
        """What every checkpoint of this run records besides its weights and step."""
        return dict(kind=self.kind, process=self.process, prediction=self.prediction,
                    autoencoder=self.autoencoder, dataset_info=self.dataset_info)

    def checkpoint_meta(self, step: int) -> dict:
        return ckpt_io.checkpoint_meta(self.model, step=step, **self._checkpoint_node())

    # ------------------------------------------------------------------ previews and evaluation
    def preview(self, ema_model, step: int, samples_dir: Path) -> Path | None:
        """A grid of ``grid_num`` images (one class per column, fixed noise, the collection solver, no
        guidance) at ``samples/step_<step>.png``; step 0 is the base."""
        if self.grid_num <= 0:
            return None
        s = self.collection.sampler
        images = sample_images(
            ema_model,
            self.process,
            self.prediction,
            self.autoencoder,
            num_samples=self.grid_num,
            solver=s["solver"],
            steps=int(s["steps"]),
            seed=self.collection.seed,
        )
        nrow = self.num_classes or int(math.sqrt(self.grid_num))
        return save_grid(images, Path(samples_dir) / f"step_{step:07d}.png", nrow=nrow)

    def evaluate(self, ema_model, step: int) -> Mapping[str, float]:
        """The held-out evaluation (main process); the best one so far is exported to ``<run>/best``."""
        if self.evaluator is None or not self.run.is_main:
            return {}
        record = self._measure(ema_model, step)
        if self.selection.better(record, self.best, self.fd_base):
            self.best = {"step": step, "judge_accuracy": record["judge_accuracy"], "fd": record["fd"]}
            if self.run.out_dir is not None:
                self._export_best(ema_model, step)
        self._write_history()
        out = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
        out["best_step"] = float(self.best["step"]) if self.best else math.nan
        return out

    def _measure(self, model, step: int) -> dict:
        t0 = time.perf_counter()
        record = {
            "step": step,
            "iteration": step / max(self.steps_per_iteration, 1),
            **self.evaluator(model, autocast=self.run.accelerator.autocast),
        }
        record["eval_s"] = time.perf_counter() - t0
        self.history.append(record)
        return record

    def _export_best(self, ema_model, step: int) -> Path:
        path = self.run.out_dir / "best"
        config = {
            **self.run_config,
            "best": {**self.best, "rule": vars(self.selection), "fd_base": self.fd_base},
        }
        ckpt_io.save_checkpoint(
            path,
            ema_model,
            config=config,
            step=step,
            update_latest=False,
            **self._checkpoint_node(),
        )
        return path

    def _history_path(self) -> Path | None:
        return self.run.out_dir / "heldout.json" if self.run.out_dir is not None else None

    def _write_history(self) -> None:
        path = self._history_path()
        if path is None or self.evaluator is None:
            return
        doc = {
            "metric": self.evaluator.metric,
            "n": self.evaluator.n,
            "seed": self.evaluator.seed,
            "fd_base": self.fd_base,
            "rule": vars(self.selection),
            "best": self.best,
            "evaluations": self.history,
        }
        with ckpt_io.atomic_file(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=1))

    def _read_history(self, resumed_from: Path) -> None:
        path = self._history_path()
        if path is None or not path.is_file() or self.evaluator is None:
            return
        step = int(ckpt_io.load_config(resumed_from).get("checkpoint", {}).get("step") or 0)
        self.history = [r for r in json.loads(path.read_text()).get("evaluations", []) if r["step"] <= step]


def _zero_std_groups(rewards: torch.Tensor, keys: torch.Tensor) -> int:
    """Groups whose rewards are all equal (they carry no signal: r = 1/2 for all their samples)."""
    return int(sum(bool(rewards[keys == g].std(unbiased=False) < 1e-12) for g in torch.unique(keys)))


def _short(record: Mapping) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
