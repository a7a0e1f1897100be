"""CASO's training as an engine objective: Adam on the semantic embeddings only, resumable exactly.

One step (arXiv 2505.14254; equations in :mod:`difftools.editing.caso`): draw a batch of training
images and, per image, an attribute value a (uniform over the K learned embeddings), a time t
(t ~ U(t_min, t_max), or the released trainer's fixed time) and noise eps; form
z_t = alpha_t z0 + sigma_t eps, the CFG one-step estimate z0_hat under e_a (uncond = the null
embedding, scale w), decode, classify, and step Adam on
CE(F(D(z0_hat)), a) + lambda_rec ||z0_hat - z0||^2.

:class:`CasoObjective` is the recipe for :class:`difftools.training.Trainer`: its model is the
embedding table (``vector`` or ``label_row`` slot, :mod:`difftools.editing.embeddings`); the DiT
(through :class:`EmbeddingDiT`), the classifier and the autoencoder are frozen helpers, so the
engine's optimizer sees only the embeddings (tested: no other parameter gets a gradient, and every
weight and buffer of the frozen models is unchanged). The engine does the rest: AdamW, atomic
checkpoints in its one layout (``<out>/checkpoints/step_*``), exact resume, the NaN/inf stop, the
run lock, ``metrics.jsonl``.

Randomness: every draw (image indices, attribute values, times, noise) comes from the objective's
own CPU generator seeded ``seed``, in the order the former loop used; its state and the per-step
history are saved in the checkpoint's objective state, so a run stopped after any checkpoint and
resumed ends with the same bits as an uninterrupted one (tested). CASO runs on one process (the
trained state is a few vectors; one GPU or the CPU is plenty).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from difftools import checkpoint as ckpt_io
from difftools.editing.caso import (
    LOSSES,
    EmbeddingDiT,
    caso_loss,
    guided_model_fn,
    one_step_x0,
    released_train_time,
)
from difftools.editing.embeddings import SLOTS, make_embeddings, save_embeddings
from difftools.training import Objective, Trainer, TrainerConfig

log = logging.getLogger(__name__)

__all__ = ["CASO_KIND", "TIMESTEPS", "CasoConfig", "CasoObjective", "CasoResult", "one_step_probability",
           "train_embeddings"]

CASO_KIND = "caso_embeddings"  #: checkpoint kind (a non-denoiser, see difftools.checkpoint)
TIMESTEPS = ("uniform", "released")
HISTORY_KEYS = ("loss", "cls", "rec", "p_target")


@dataclass
class CasoConfig:
    """Options of :func:`train_embeddings` (defaults: the paper's w = 10, Adam lr 1e-2; lambda_rec = 0 as
    in the released trainer).

    Args:
        guidance_scale: CFG scale w of the one-step estimate (uncond = null embedding).
        timestep: ``uniform``: t ~ U(t_min, t_max) (t = 1 noise); ``released``: every step at the one
            time whose SNR equals the released trainer's fixed DDPM step 401 of SD v1's schedule
            (:func:`difftools.editing.caso.released_train_time`; flow t = 0.5388).
        t_min, t_max: the uniform range.
        lambda_rec: weight of ||z0_hat - z0||^2 (0 in the released trainer).
        loss: ``ce`` (cross-entropy) or ``prob_mse`` ((1 - p_a)^2, the released trainer's form).
        slot: ``vector`` (a free vector in the DiT's conditioning space) or ``label_row`` (a new
            label-table row in the span of the trained rows); :mod:`difftools.editing.embeddings`.
        lr, betas, weight_decay: AdamW (weight decay 0 = plain Adam).
        batch_size, max_steps, seed: the run.
        log_every: metrics.jsonl interval in steps (0 = only at the end).
        ckpt_every: checkpoint interval in steps (0 = only at the end); keep_last of them are kept.
    """

    guidance_scale: float = 10.0
    timestep: str = "uniform"
    t_min: float = 0.3
    t_max: float = 0.7
    lambda_rec: float = 0.0
    loss: str = "ce"
    slot: str = "vector"
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    batch_size: int = 32
    max_steps: int = 300
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 100
    keep_last: int = 2

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown CASO loss {self.loss!r}; choose one of {LOSSES}")
        if self.timestep not in TIMESTEPS:
            raise ValueError(f"unknown caso.timestep {self.timestep!r}; choose one of {TIMESTEPS}")
        if self.slot not in SLOTS:
            raise ValueError(f"unknown caso.slot {self.slot!r}; choose one of {SLOTS}")
        if not 0.0 < self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"need 0 < t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if self.batch_size < 1 or self.max_steps < 0:
            raise ValueError("batch_size must be >= 1 and max_steps >= 0")
        if self.lambda_rec < 0:
            raise ValueError(f"lambda_rec must be >= 0, got {self.lambda_rec}")
        self.betas = tuple(float(b) for b in self.betas)

    def trainer_config(self, device: str = "cpu", cpu_threads: int | None = None) -> TrainerConfig:
        """The engine's options: AdamW at a constant rate without warmup, no clipping, no EMA (as the
        released trainer: its diffusers ``constant`` schedule ignores its ``warmup_steps=10``)."""
        never = max(self.max_steps, 1)
        return TrainerConfig(
            batch_size=self.batch_size, max_steps=self.max_steps, optimizer="adamw", lr=self.lr,
            betas=self.betas, weight_decay=self.weight_decay, warmup_steps=0, lr_decay="constant",
            grad_clip=0.0, ema_decay=0.0, seed=self.seed, log_every=self.log_every or never,
            ckpt_every=self.ckpt_every, keep_last=self.keep_last, sample_every=0, eval_every=0,
            progress=False, tensorboard=False, device="cpu" if str(device) == "cpu" else "auto",
            cpu_threads=cpu_threads)


@dataclass
class CasoResult:
    embeddings: nn.Module          #: the trained embeddings (``vectors()`` [K, D])
    step: int
    history: list[dict]            #: per step: loss, cls, rec, p_target (across resumes)
    seconds: float
    path: Path | None              #: <out>/embeddings.safetensors, or None


class CasoObjective(Objective):
    """CASO's training step (module docstring) for :class:`difftools.training.Trainer`.

    Args:
        embeddings: the trained table (:func:`difftools.editing.embeddings.make_embeddings`).
        dit: the class-conditional DiT (frozen here).
        process, prediction: what it was trained with.
        classifier: logits = classifier(image in [-1, 1]) (frozen here).
        images: training images [N, C, H, W] in [-1, 1] (pixels; encoded with ``autoencoder``), kept
            on the CPU and indexed per batch.
        config: :class:`CasoConfig`.
        autoencoder: the DiT's autoencoder (None for pixel models; frozen here).
    """

    kind = CASO_KIND

    def __init__(self, embeddings: nn.Module, dit: nn.Module, process, prediction: str, classifier: nn.Module,
                 images: torch.Tensor, config: CasoConfig, autoencoder: nn.Module | None = None):
        super().__init__(embeddings)
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got {tuple(images.shape)}")
        num_classes = getattr(classifier, "num_classes", None)
        if num_classes is not None and any(not 0 <= a < num_classes for a in embeddings.targets):
            raise ValueError(f"targets {embeddings.targets} out of range for a {num_classes}-class "
                             "classifier")
        self.register_frozen("net", EmbeddingDiT(dit))
        self.register_frozen("classifier", classifier)
        self.register_frozen("autoencoder", autoencoder)
        self.process, self.prediction, self.cfg = process, prediction, config
        self.images = images.detach().float().cpu()
        self.fixed_t = released_train_time(process) if config.timestep == "released" else None
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.history: list[list[float]] = []
        self._pending: list[list[float]] = []
        self._guided = None

    def on_start(self, run, resumed_from):
        if run.world_size > 1:
            raise RuntimeError("CASO embedding training runs on one process (its draws come from one "
                               "generator); launch it without accelerate / torchrun")
        # after the engine moved the frozen DiT to the device: the null row lives there too
        self._guided = guided_model_fn(self.net, self.process, self.prediction, self.cfg.guidance_scale)

    def draw_times(self, n: int) -> torch.Tensor:
        """t for n images: the fixed released time, or U(t_min, t_max) from the objective's generator."""
        if self.fixed_t is not None:
            return torch.full((n,), self.fixed_t)
        return self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * torch.rand(n, generator=self.generator)

    def _draw(self):
        b = self.cfg.batch_size
        idx = torch.randint(0, len(self.images), (b,), generator=self.generator)
        which = torch.randint(0, len(self.model.names), (b,), generator=self.generator)
        return self.images[idx], which, self.draw_times(b)

    def batches(self, start, run):
        # lazily: batch k is drawn when the engine asks for it, after a resume restored the generator
        return (self._draw() for _ in itertools.count(start))

    def forward(self, batch, generator):
        x, which, t = batch
        ae = self.autoencoder
        z0 = ae.encode(x) if ae is not None else x
        eps = torch.randn(z0.shape, generator=self.generator).to(z0.device)
        z_t = self.process.marginal(z0, eps, t).float()
        z0_hat = one_step_x0(self._guided, z_t, t, self.model(which))
        image = ae.decode(z0_hat) if ae is not None else z0_hat
        loss, parts = caso_loss(self.classifier(image), self.model.target_tensor(which), z0_hat, z0,
                                self.cfg.lambda_rec, self.cfg.loss)
        self._pending.append([float(loss.detach()), parts["cls"], parts["rec"], parts["p_target"]])
        return loss, parts

    def after_step(self, step):
        # one history row per optimizer step (the mean of its micro-batches)
        row = [sum(v) / len(self._pending) for v in zip(*self._pending, strict=True)]
        self._pending = []
        self.history.append(row)
        with torch.no_grad():
            moved = (self.model.vectors() - self.net.null_embedding()).norm(dim=1).mean()
        return {"distance_from_null": moved}

    def extra_state(self):
        return {"generator": self.generator.get_state(),
                "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, len(HISTORY_KEYS))}

    def load_extra_state(self, state):
        if set(state) != {"generator", "history"}:
            raise ckpt_io.CheckpointError(f"CASO objective state has {sorted(state)}, expected generator and "
                                          "history: not written by CasoObjective")
        self.generator.set_state(state["generator"])
        self.history = state["history"].tolist()

    def checkpoint_meta(self, step):
        return ckpt_io.checkpoint_meta(self.model, kind=self.kind, step=step)

    def history_dicts(self) -> list[dict]:
        return [{"step": i + 1, **dict(zip(HISTORY_KEYS, row, strict=True))}
                for i, row in enumerate(self.history)]


def check_resumable(out_dir: Path, embeddings: nn.Module) -> None:
    """Refuse to resume a run at ``out_dir`` that learned other names, targets or another slot (the
    engine would load its weights into this table without noticing when the shapes agree)."""
    ckpt = ckpt_io.read_latest(out_dir / "checkpoints")
    if ckpt is None or not ckpt.is_dir():
        return  # nothing to resume (a dangling pointer is the engine's error, with its message)
    node = ckpt_io.checkpoint_node(ckpt_io.load_config(ckpt), ckpt / ckpt_io.CONFIG_FILE)
    theirs = (node.get("model_class"), node["model"].get("names"), node["model"].get("targets"))
    ours = (ckpt_io.rebuildable_name(embeddings), embeddings.names, embeddings.targets)
    if node.get("kind") != CASO_KIND or theirs != ours:
        raise ckpt_io.CheckpointError(
            f"cannot resume from {ckpt}: it learned {theirs[1]} -> {theirs[2]} ({theirs[0]}), this run "
            f"learns {ours[1]} -> {ours[2]} ({ours[0]}); pass another out= or the same attribute and slot")


@torch.no_grad()
def one_step_probability(dit: nn.Module, process, prediction: str, classifier: nn.Module,
                         images: torch.Tensor, embeddings: nn.Module,
                         guidance_scale: float = 10.0, t_min: float = 0.3, t_max: float = 0.7,
                         autoencoder: nn.Module | None = None, seed: int = 1234,
                         batch_size: int = 256) -> list[float]:
    """Mean classifier probability of each row's target on the one-step CFG estimates of ``images``
    (fixed t ~ U(t_min, t_max) and noise from ``seed``: the same draws for every row and every call;
    t_min = t_max for one fixed time). The training objective's quantity, measured on a fixed sample,
    before and after training."""
    net = EmbeddingDiT(dit)
    mf = guided_model_fn(net, process, prediction, guidance_scale)
    vectors = embeddings.vectors().detach()
    device = vectors.device
    out = []
    for k in range(len(embeddings.names)):
        gen = torch.Generator().manual_seed(int(seed))
        total = 0.0
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            z0 = autoencoder.encode(x) if autoencoder is not None else x
            t = (t_min + (t_max - t_min) * torch.rand(len(x), generator=gen)).to(device)
            eps = torch.randn(z0.shape, generator=gen).to(device)
            z_t = process.marginal(z0, eps, t).float()
            z0_hat = one_step_x0(mf, z_t, t, vectors[k].expand(len(x), -1))
            image = autoencoder.decode(z0_hat) if autoencoder is not None else z0_hat
            total += classifier(image).float().softmax(-1)[:, embeddings.targets[k]].sum().item()
        out.append(total / len(images))
    return out


def train_embeddings(
    dit: nn.Module,
    process,
    prediction: str,
    classifier: nn.Module,
    images: torch.Tensor,
    names: list[str],
    targets: list[int] | None = None,
    config: CasoConfig | None = None,
    autoencoder: nn.Module | None = None,
    out_dir: str | Path | None = None,
    meta: dict | None = None,
    device: str | torch.device = "cpu",
    cpu_threads: int | None = None,
) -> CasoResult:
    """Learn one conditioning embedding per name (steering ``classifier`` toward ``targets``) with
    :class:`CasoObjective` on the training engine.

    Args:
        dit: a class-conditional DiT (frozen here).
        process, prediction: what the DiT was trained with (e.g. ``difftools.load(...)``'s).
        classifier: logits = classifier(image in [-1, 1]) (frozen here).
        images: training images [N, C, H, W] in [-1, 1] (pixels; encoded with ``autoencoder``).
        names, targets: one learned embedding per name; ``targets[k]`` is its classifier class.
        config: :class:`CasoConfig`.
        autoencoder: the DiT's autoencoder (None or identity for pixel models).
        out_dir: the run directory: checkpoints (``checkpoints/step_*``, the engine's layout),
            ``metrics.jsonl`` and the final ``embeddings.safetensors``; a run there with a
            ``checkpoints/latest`` pointer is resumed. None: nothing is written.
        meta: extra metadata for the embeddings file and the checkpoints' config.yaml (base
            checkpoint, classifier, ...).
        device: ``cpu``, or anything else for the engine's choice (CUDA when present).
    """
    cfg = config or CasoConfig()
    net = EmbeddingDiT(dit)
    embeddings = make_embeddings(cfg.slot, net.label_table(), net.null_class, names, targets)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_resumable(out, embeddings)
    objective = CasoObjective(embeddings, dit, process, prediction, classifier, images, cfg, autoencoder)
    meta = {"config": asdict(cfg), **(meta or {})}
    tcfg = cfg.trainer_config(str(torch.device(device).type), cpu_threads)
    if out is not None:
        tcfg.resume = "auto"
    result = Trainer(objective, tcfg, out, run_config={"caso": meta}).train()
    path = None
    if out is not None:
        path = save_embeddings(out / "embeddings.safetensors", embeddings, meta | {"step": result.step})
    return CasoResult(embeddings=embeddings, step=result.step, history=objective.history_dicts(),
                      seconds=result.seconds, path=path)
