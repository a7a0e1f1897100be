"""DiffusionNFT fine-tuning of a flow DiT: ``python train/nft.py base=<checkpoint or run dir> [key=value]``.

Online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117; method and equations in
:mod:`difftools.rl.nft`, options in conf/nft.yaml, results in docs/nft.md). Each iteration k:

1. collect ``groups x group_size`` clean samples with the old policy and ``samplers.sample`` (no
   CFG); sample i of iteration k starts from noise seeded by ``[seed, k * N + i]`` and carries
   the label of its group, so the data do not depend on the device count;
2. reward them, gather over devices, advantages per group with the global std, r in [0, 1];
3. ``inner_epochs`` passes of minibatch updates of the NFT loss (AdamW, grad clip, EMA);
4. soft-update the old policy, log one line of ``metrics.jsonl``, maybe checkpoint / grid.

All randomness of iteration k is drawn from generators seeded by (seed, k, rank), so a resumed run
(``resume=auto``) repeats the uninterrupted run's numbers exactly on CPU. Checkpoints follow
:mod:`difftools.checkpoint` (``difftools.load`` and ``scripts/sample.py`` read them) plus ``state/``
(optimizer, old-policy weights, RNG, iteration).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train.nft")

REWARD_KEYS = {"classifier": ("classifier", "log_prob", "quantize"), "brightness": ("target",)}


@dataclass
class NFTResult:
    iteration: int
    losses: list[float] = field(default_factory=list)   #: mean loss of each iteration run by this call
    checkpoint: Path | None = None
    grid: Path | None = None
    seconds: float = 0.0


def load_base(path, weights: str = "ema", device="cpu"):
    """The base checkpoint (``difftools.load``), refused unless it is a flow-matching model."""
    from difftools.checkpoint import CheckpointError, load
    from difftools.process import Flow

    if weights not in ("ema", "raw"):
        raise ValueError(f"base_weights must be 'ema' or 'raw', got {weights!r}")
    try:
        loaded = load(path, use_ema=weights == "ema", device=device)
    except CheckpointError as err:
        raise FileNotFoundError(
            f"base checkpoint {path!r} cannot be loaded ({err}). DiffusionNFT fine-tunes a trained flow DiT: "
            "make one with `python train/dit.py` (~3.5 min on CPU, writes runs/dit/<date>) and pass "
            "base=runs/dit/<date>") from None
    if not isinstance(loaded.process, Flow) or loaded.prediction != "flow":
        # NFT's implicit policies mix velocities; other parameterisations would silently reweight
        # the loss over t, so they are refused rather than converted (docs/nft.md)
        raise ValueError(
            f"base checkpoint {loaded.path} was trained with process {loaded.process!r} and prediction "
            f"{loaded.prediction!r}; DiffusionNFT here needs a rectified-flow base (process Flow, prediction "
            "'flow'): train one with `python train/dit.py process=flow`")
    return loaded


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


class NFTRun:
    """Everything but Hydra. ``NFTRun(cfg, out_dir).run() -> NFTResult``; ``cfg`` is the conf/nft.yaml
    mapping (a DictConfig or a plain dict)."""

    def __init__(self, cfg, out_dir, accelerator=None):
        from accelerate import Accelerator

        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        if OmegaConf.is_missing(cfg, "base") or not cfg.base:
            raise ValueError("base=<checkpoint or run dir> is required: the flow DiT to fine-tune (make one "
                             "with `python train/dit.py`, ~3.5 min on CPU, then base=runs/dit/<date>)")
        self.cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        OmegaConf.set_struct(self.cfg, True)  # a misspelt key is an error, not a silent None
        self.out_dir = Path(out_dir)
        c = self.cfg
        if c.device not in ("auto", "cpu"):
            raise ValueError(f"device must be 'auto' or 'cpu', got {c.device!r}")
        if c.reward not in REWARD_KEYS:
            raise ValueError(f"unknown reward {c.reward!r}; expected one of {sorted(REWARD_KEYS)}")
        cpu = c.device == "cpu" or not torch.cuda.is_available()
        mp = c.mixed_precision
        self.acc = accelerator or Accelerator(mixed_precision="no" if mp == "auto" and cpu else
                                              ("bf16" if mp == "auto" else mp), cpu=cpu)
        self.device = self.acc.device
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.num_samples = int(c.groups) * int(c.group_size)
        self._check_batches()
        self.per_device = self.num_samples // self.world
        self.per_device_train = int(c.train_batch) // self.world
        self.ckpt_root = self.out_dir / "checkpoints"
        self.iteration = 0
        self.last_checkpoint: Path | None = None

    def _check_batches(self) -> None:
        c, n, w = self.cfg, self.num_samples, self.world
        if int(c.groups) < 1 or int(c.group_size) < 2:
            raise ValueError(f"need groups >= 1 and group_size >= 2 (advantages are centred per group); got "
                             f"groups={c.groups}, group_size={c.group_size}")
        if n % w or int(c.train_batch) % w:
            raise ValueError(f"groups x group_size = {n} samples and train_batch = {c.train_batch} must both "
                             f"be divisible by the world size {w}; per-device sizes are derived from these "
                             "global ones")
        if int(c.train_batch) < 1 or n % int(c.train_batch):
            raise ValueError(f"train_batch = {c.train_batch} must divide the {n} samples of an iteration "
                             f"(groups x group_size)")

    # ------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def setup(self) -> None:
        from difftools.rl import NFTObjective, OldPolicy
        from difftools.training.ema import EMA
        from samplers.schedules import get_times

        c = self.cfg
        if self.device.type == "cpu" and c.cpu_threads:
            torch.set_num_threads(int(c.cpu_threads))
        base = load_base(c.base, c.base_weights, device=self.device)
        self.base = base
        self.process, self.prediction, self.autoencoder = base.process, base.prediction, base.autoencoder
        self.raw_model = base.model
        # eval mode = no label dropout: the conditional policy is trained, the null class is left alone
        self.raw_model.eval()
        self.raw_model.requires_grad_(True)
        self.num_classes = int(getattr(self.raw_model, "num_classes", 0) or 0)
        self.ref_model = (copy.deepcopy(self.raw_model).requires_grad_(False).eval()
                          if float(c.loss.ref_weight) > 0 else None)
        self.old = OldPolicy(self.raw_model, c.old.rate, c.old.cap, c.old.flat)
        self.ema = EMA(self.raw_model, float(c.ema.decay), bool(c.ema.warmup))
        self.times = get_times(self.process, c.sampler.schedule, int(c.sampler.steps), 1.0,
                               float(c.sampler.t_end))
        self.objective = NFTObjective(self.process, beta=c.loss.beta, form=c.loss.form,
                                      ref_weight=c.loss.ref_weight, t_source=c.loss.t_source,
                                      times=self.times[:-1], t_per_sample=c.loss.t_per_sample,
                                      t_min=c.loss.t_min, t_max=c.loss.t_max)
        self.reward = self._build_reward()
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(c.optim.lr), betas=tuple(float(b) for b in c.optim.betas),
                                weight_decay=float(c.optim.weight_decay))
        self.module, self.opt = self.acc.prepare(self.raw_model, opt)
        self.params = params
        self.base_sha = self._base_sha()
        resume = self._resume_path()
        if resume is not None:
            self._load(resume)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log.info("base %s (%s weights, %.2fM params); %d samples per iteration = %d groups x %d over "
                     "%d device(s) = %d per device; train batch %d global = %d per device, %d steps per "
                     "iteration", base.path, c.base_weights, sum(p.numel() for p in params) / 1e6,
                     self.num_samples, c.groups, c.group_size, self.world, self.per_device, c.train_batch,
                     self.per_device_train, self.steps_per_iteration)

    @property
    def steps_per_iteration(self) -> int:
        return int(self.cfg.inner_epochs) * self.num_samples // int(self.cfg.train_batch)

    def _build_reward(self):
        from difftools.rl import build_reward

        c = self.cfg
        opts = {k: c.reward_opts[k] for k in REWARD_KEYS[c.reward] if k in c.reward_opts}
        reward = build_reward(c.reward, self.base.dataset_info, **opts)
        if hasattr(reward, "net"):
            reward.net.to(self.device)
        return reward

    def _base_sha(self) -> str:
        from difftools.checkpoint import EMA_FILE, MODEL_FILE, weights_sha256

        # the file's sha256, or one over a sharded base's index and shards
        return weights_sha256(self.base.path, EMA_FILE if self.cfg.base_weights == "ema" else MODEL_FILE)

    # ------------------------------------------------------------------ one iteration
    def my_indices(self) -> range:
        return range(self.rank * self.per_device, (self.rank + 1) * self.per_device)

    @torch.no_grad()
    def collect(self, k: int):
        """(x0 latents [n, ...], decoded images in [-1, 1], labels [n]) of this device's share."""
        from difftools.metrics.generate import image_noise
        from samplers import ModelFn, sample

        c, model = self.cfg, self.old.model
        labels = iteration_labels(c.seed, k, int(c.groups), self.num_classes)
        labels = labels.repeat_interleave(int(c.group_size))[list(self.my_indices())]
        shape = (model.in_channels, model.input_size, model.input_size)
        mf = ModelFn(lambda x, t, **cond: model(x, t, **cond), self.process, self.prediction)
        xs, images = [], []
        idx = list(self.my_indices())
        for start in range(0, len(idx), int(c.collect_batch)):
            chunk = idx[start:start + int(c.collect_batch)]
            x_T = image_noise(c.seed, [k * self.num_samples + i for i in chunk], shape).to(self.device)
            cond = {"y": labels[start:start + len(chunk)].to(self.device)} if self.num_classes else {}
            with self.acc.autocast():
                x0 = sample(mf, self.process.sigma(1.0).item() * x_T, solver=c.sampler.solver,
                            steps=int(c.sampler.steps), schedule=c.sampler.schedule, t_start=1.0,
                            t_end=float(c.sampler.t_end), denoise_final=True,
                            **OmegaConf.to_container(c.sampler.opts), **cond).float()
                img = self.autoencoder.decode(x0).float() if self.autoencoder is not None else x0
            xs.append(x0)
            images.append(img.clamp(-1, 1))
        return torch.cat(xs), torch.cat(images), labels

    def advantages(self, k: int, rewards: torch.Tensor, labels: torch.Tensor):
        """(r of this device's samples, global rewards): advantages use every device's rewards."""
        from difftools.rl import group_advantages, optimality_weights

        everyone = self.acc.gather(rewards.to(self.device).float().contiguous()).cpu()
        groups = torch.arange(int(self.cfg.groups)).repeat_interleave(int(self.cfg.group_size))
        adv = group_advantages(everyone, groups)
        r = optimality_weights(adv, float(self.cfg.loss.adv_clip)).float()
        return r[list(self.my_indices())], everyone, adv

    def train_iteration(self, k: int, x0, labels, r) -> dict:
        from difftools.training import NonFiniteLossError

        c = self.cfg
        gen_cpu = torch.Generator().manual_seed(derived_seed(c.seed, k, self.rank, 1))
        gen = torch.Generator(device=self.device).manual_seed(derived_seed(c.seed, k, self.rank, 2))
        losses, logs_all, grad_norms = [], {}, []
        x0, r = x0.to(self.device), r.to(self.device)
        y = labels.to(self.device) if self.num_classes else None
        for epoch in range(int(c.inner_epochs)):
            perm = torch.randperm(self.per_device, generator=gen_cpu)
            for j in range(self.per_device // self.per_device_train):
                idx = perm[j * self.per_device_train:(j + 1) * self.per_device_train].to(self.device)
                with self.acc.autocast():
                    loss, logs = self.objective(self.module, self.old.model, x0[idx],
                                                None if y is None else y[idx], r[idx], gen, self.ref_model)
                value = float(loss.detach())
                if not math.isfinite(value):
                    last = self.last_checkpoint or _latest(self.ckpt_root)
                    raise NonFiniteLossError(
                        f"NFT loss is {value} at iteration {k + 1}, epoch {epoch}, minibatch {j}: stopping "
                        f"before the update; nothing after iteration {k} was written. Last good checkpoint: "
                        f"{last if last else '(none yet)'}; resume from it with resume=<that dir>, e.g. with "
                        "a lower optim.lr, a larger loss.beta or optim.grad_clip")
                self.acc.backward(loss)
                if float(c.optim.grad_clip) > 0:
                    grad_norms.append(float(self.acc.clip_grad_norm_(self.params, float(c.optim.grad_clip))))
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.ema.update(self.raw_model)
                losses.append(value)
                for name, v in logs.items():
                    logs_all.setdefault(name, []).append(float(v))
        out = {"loss": sum(losses) / len(losses), "losses": losses}
        out.update({name: sum(v) / len(v) for name, v in logs_all.items()})
        if grad_norms:
            out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return out

    # ------------------------------------------------------------------ loop
    def run(self) -> NFTResult:
        c = self.cfg
        t_start = time.perf_counter()
        self.setup()
        result = NFTResult(iteration=self.iteration)
        pbar = None
        if c.progress and self.is_main:
            from tqdm.auto import tqdm

            pbar = tqdm(total=int(c.iterations), initial=self.iteration, desc="nft", dynamic_ncols=True)
        if self.iteration == 0 and int(c.iterations) > 0:
            result.grid = self.sample_grid()  # the base model's grid: the "before" picture
        while self.iteration < int(c.iterations):
            k = self.iteration
            t0 = time.perf_counter()
            x0, images, labels = self.collect(k)
            rewards, reward_logs = self.reward.evaluate(images, labels.to(images.device)
                                                        if self.num_classes else None)
            r, everyone, adv = self.advantages(k, rewards, labels)
            t1 = time.perf_counter()
            stats = self.train_iteration(k, x0, labels, r)
            d = self.old.update(self.raw_model, k)
            self.iteration = k + 1
            t2 = time.perf_counter()
            result.losses.append(stats["loss"])
            record = {"iteration": self.iteration, "reward_mean": everyone.mean().item(),
                      "reward_std": everyone.std(unbiased=False).item(), "reward_min": everyone.min().item(),
                      "reward_max": everyone.max().item()}
            record.update({f"reward_{name}": self._mean_over_devices(v) for name, v in reward_logs.items()})
            record.update({"r_mean": self._mean_over_devices(r.mean().item()),
                           "adv_abs_mean": adv.abs().mean().item(),
                           "zero_std_groups": self._zero_std_groups(everyone)})
            record.update({key: v for key, v in stats.items() if key != "losses"})
            record.update({"x0_norm": self._mean_over_devices((x0.float() ** 2).mean().item()),
                           "brightness": self._mean_over_devices(((images + 1) / 2).mean().item()),
                           "old_decay": d, "lr": self.opt.param_groups[0]["lr"], "collect_s": t1 - t0,
                           "train_s": t2 - t1})
            self._log_json(record)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(reward=f"{record['reward_mean']:.4f}", loss=f"{stats['loss']:.4f}")
            last = self.iteration >= int(c.iterations)
            if last or (int(c.ckpt_every) > 0 and self.iteration % int(c.ckpt_every) == 0):
                result.checkpoint = self.save()
            if last or (int(c.sample_every) > 0 and self.iteration % int(c.sample_every) == 0):
                result.grid = self.sample_grid()
        if pbar is not None:
            pbar.close()
        self.acc.wait_for_everyone()
        result.iteration, result.seconds = self.iteration, time.perf_counter() - t_start
        result.checkpoint = result.checkpoint or self.last_checkpoint
        return result

    def _mean_over_devices(self, value: float) -> float:
        return self.acc.reduce(torch.tensor([float(value)], device=self.device), reduction="mean").item()

    def _zero_std_groups(self, rewards: torch.Tensor) -> int:
        """Groups whose rewards are all equal (they carry no signal: r = 1/2 for all their samples)."""
        per_group = rewards.reshape(int(self.cfg.groups), int(self.cfg.group_size))
        return int((per_group.std(dim=1, unbiased=False) < 1e-12).sum())

    def _log_json(self, record: dict) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ grids and checkpoints
    def sample_grid(self) -> Path | None:
        """A grid of the EMA model's samples (fixed noise, labels 0..9 per row, the collection
        solver, no guidance) at ``samples/iter_<k>.png``."""
        from difftools.training.grid import sample_images, save_grid

        path = None
        if self.is_main and int(self.cfg.sample_num) > 0:
            model = self.ema.copy_to(copy.deepcopy(self.raw_model)).eval()
            images = sample_images(model, self.process, self.prediction, self.autoencoder,
                                   num_samples=int(self.cfg.sample_num), solver=self.cfg.sampler.solver,
                                   steps=int(self.cfg.sampler.steps), seed=int(self.cfg.seed),
                                   device=self.device)
            nrow = self.num_classes or int(math.sqrt(int(self.cfg.sample_num)))
            path = save_grid(images, self.out_dir / "samples" / f"iter_{self.iteration:07d}.png", nrow=nrow)
        self.acc.wait_for_everyone()
        return path

    def checkpoint_config(self) -> dict:
        from difftools import checkpoint as ckpt_io

        config = OmegaConf.to_container(self.cfg, resolve=True)
        # the base run's data node lets evaluation find non-embedded datasets (data.root)
        config["data"] = self.base.config.get("data")
        config["base_checkpoint"] = {"path": str(self.base.path), "weights_sha256": self.base_sha}
        config["checkpoint"] = ckpt_io.checkpoint_meta(
            self.raw_model, kind="dit", process=self.process, prediction=self.prediction,
            autoencoder=self.autoencoder, dataset_info=self.base.dataset_info, step=self.iteration)
        return config

    def save(self) -> Path:
        """``checkpoints/iter_<k>``: model (theta), ema, config.yaml, state/ (optimizer, old policy,
        RNG, nft.json); written atomically, then ``latest`` moves and old ones are pruned."""
        from difftools import checkpoint as ckpt_io
        from difftools.training.state import capture_rng

        path = self.ckpt_root / f"iter_{self.iteration:07d}"
        if self.is_main:
            with ckpt_io.atomic_directory(path) as tmp:
                state = tmp / ckpt_io.STATE_DIR
                state.mkdir()
                ckpt_io.save_weights(tmp / ckpt_io.MODEL_FILE, self.raw_model.state_dict())
                ckpt_io.save_weights(tmp / ckpt_io.EMA_FILE, self.ema.state_dict())
                ckpt_io.save_weights(state / "old.safetensors", self.old.state_dict())
                # after every weight file: config.yaml records their sha256 (checked on load)
                config = ckpt_io.record_weight_hashes(self.checkpoint_config(), tmp)
                ckpt_io.save_config(tmp / ckpt_io.CONFIG_FILE, config)
                torch.save(self.opt.state_dict(), state / "optimizer.pt")
                torch.save(capture_rng(), state / "rng.pt")
                c = self.cfg
                meta = {"iteration": self.iteration, "ema_updates": self.ema.num_updates, "seed": int(c.seed),
                        "groups": int(c.groups), "group_size": int(c.group_size),
                        "train_batch": int(c.train_batch), "inner_epochs": int(c.inner_epochs),
                        "world_size": self.world, "base": str(self.base.path), "base_sha256": self.base_sha}
                (state / "nft.json").write_text(json.dumps(meta, indent=1))
            ckpt_io.write_latest(self.ckpt_root, path.name)
            ckpt_io.prune_checkpoints(self.ckpt_root, int(self.cfg.keep_last), prefix="iter_")
        self.acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def _resume_path(self) -> Path | None:
        from difftools import checkpoint as ckpt_io

        r = self.cfg.resume
        if not r:
            return None
        if str(r) == "auto":
            return _latest(self.ckpt_root)
        return ckpt_io.resolve_checkpoint(r)

    def _load(self, path: Path) -> None:
        """Restore theta, EMA, old policy, optimizer, RNG and the iteration count."""
        from difftools import checkpoint as ckpt_io
        from difftools.training.state import restore_rng

        meta = ckpt_io.read_json(ckpt_io.require_file(path, f"{ckpt_io.STATE_DIR}/nft.json"))
        c = self.cfg
        for key in ("seed", "groups", "group_size", "train_batch", "inner_epochs"):
            if meta.get(key) != int(c[key]):
                raise ckpt_io.CheckpointError(
                    f"{path} was written with {key}={meta.get(key)}, this run has {key}={c[key]}: the "
                    f"collected samples and updates would differ from the interrupted run; set "
                    f"{key}={meta.get(key)}")
        if meta.get("base_sha256") != self.base_sha:
            raise ckpt_io.CheckpointError(
                f"{path} fine-tunes base {meta.get('base')} (weights sha256 "
                f"{str(meta.get('base_sha256'))[:12]}), but base={c.base} has sha256 {self.base_sha[:12]}: "
                "the reference model would differ")
        node = ckpt_io.checkpoint_node(ckpt_io.load_config(path), path / ckpt_io.CONFIG_FILE)
        self.raw_model.load_state_dict(ckpt_io.read_checkpoint_weights(path, ckpt_io.MODEL_FILE, node))
        self.ema.load_state_dict(ckpt_io.read_checkpoint_weights(path, ckpt_io.EMA_FILE, node),
                                 meta["ema_updates"])
        self.old.load_state_dict(ckpt_io.read_checkpoint_weights(path, "state/old.safetensors", node))
        self.opt.load_state_dict(ckpt_io.torch_load(ckpt_io.require_file(path, "state/optimizer.pt")))
        restore_rng(ckpt_io.torch_load(ckpt_io.require_file(path, "state/rng.pt")))
        self.iteration = int(meta["iteration"])
        self.last_checkpoint = path
        if self.is_main:
            log.info("resumed from %s at iteration %d", path, self.iteration)


def _latest(root: Path) -> Path | None:
    from difftools import checkpoint as ckpt_io

    return ckpt_io.read_latest(root) if Path(root).is_dir() else None


def run(cfg, out_dir, accelerator=None) -> NFTResult:
    """Fine-tune as configured; returns the final iteration, per-iteration losses and paths."""
    return NFTRun(cfg, out_dir, accelerator).run()


@hydra.main(version_base="1.3", config_path="../conf", config_name="nft")
def main(cfg: DictConfig) -> float:
    from accelerate.utils import broadcast_object_list
    from hydra.core.hydra_config import HydraConfig

    nft = NFTRun(cfg, "")
    # every rank must write to rank 0's run directory (Hydra's timestamp may differ by a second)
    nft.out_dir = Path(broadcast_object_list([HydraConfig.get().runtime.output_dir])[0])
    nft.ckpt_root = nft.out_dir / "checkpoints"
    result = nft.run()
    if nft.is_main:
        log.info("done: iteration %d, %.1f s; checkpoint %s; samples %s", result.iteration, result.seconds,
                 result.checkpoint, result.grid)
    return result.losses[-1] if result.losses else float("nan")


if __name__ == "__main__":
    main()
