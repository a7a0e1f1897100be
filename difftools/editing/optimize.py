"""CASO's training loop: Adam on the semantic embeddings only, resumable exactly.

One step (arXiv 2505.14254; equations in :mod:`difftools.editing.caso`): draw a batch of training
images and, per image, an attribute value a (uniform over the K learned embeddings), a time
t ~ U(t_min, t_max) and noise eps; form z_t = alpha_t z0 + sigma_t eps, the CFG one-step estimate
z0_hat under e_a (uncond = the null embedding, scale w), decode, classify, and step Adam on
CE(F(D(z0_hat)), a) + lambda_rec ||z0_hat - z0||^2. The DiT, the autoencoder and the classifier are
frozen (``requires_grad_(False)``, eval mode) and only the embedding table is handed to the
optimizer, so nothing else can change (tested by checksums).

All randomness comes from one ``torch.Generator`` whose state is checkpointed with the embeddings
and Adam's moments, so a run stopped after any checkpoint and resumed ends with the same bits as an
uninterrupted run (tested).

Checkpoints: ``<out>/checkpoints/step_XXXXXXX/`` (``embeddings.safetensors``, ``state.pt``) written
with :func:`difftools.checkpoint.atomic_directory`, plus the ``latest`` pointer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from difftools.checkpoint import CheckpointError, atomic_directory, read_latest, torch_load, write_latest
from difftools.editing.caso import (
    LOSSES,
    EmbeddingDiT,
    SemanticEmbeddings,
    caso_loss,
    guided_model_fn,
    load_embeddings,
    one_step_x0,
    save_embeddings,
)

log = logging.getLogger(__name__)

__all__ = ["CasoConfig", "CasoResult", "one_step_probability", "train_embeddings"]


@dataclass
class CasoConfig:
    """Options of :func:`train_embeddings` (defaults: the paper's w = 10, Adam lr 1e-2; lambda_rec = 0 as
    in the released trainer).

    Args:
        guidance_scale: CFG scale w of the one-step estimate (uncond = null embedding).
        t_min, t_max: the training time range, t ~ U(t_min, t_max) (t = 1 noise). The released
            trainer uses one fixed mid time (step 400 of 1000); t_min = t_max reproduces that.
        lambda_rec: weight of ||z0_hat - z0||^2 (0 in the released trainer).
        loss: ``ce`` (cross-entropy) or ``prob_mse`` ((1 - p_a)^2, the released trainer's form).
        lr, betas, weight_decay: Adam (weight decay as in AdamW, decoupled; 0 = plain Adam).
        batch_size, max_steps, seed: the run.
        log_every, ckpt_every: in steps (0 = only at the end).
    """

    guidance_scale: float = 10.0
    t_min: float = 0.3
    t_max: float = 0.7
    lambda_rec: float = 0.0
    loss: str = "ce"
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    batch_size: int = 32
    max_steps: int = 300
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 100

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown CASO loss {self.loss!r}; choose one of {LOSSES}")
        if not 0.0 < self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"need 0 < t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if self.batch_size < 1 or self.max_steps < 0:
            raise ValueError("batch_size must be >= 1 and max_steps >= 0")
        if self.lambda_rec < 0:
            raise ValueError(f"lambda_rec must be >= 0, got {self.lambda_rec}")
        self.betas = tuple(float(b) for b in self.betas)


@dataclass
class CasoResult:
    embeddings: SemanticEmbeddings
    step: int
    history: list[dict]
    seconds: float
    path: Path | None


def _frozen(module: nn.Module | None) -> None:
    if module is not None:
        module.eval().requires_grad_(False)


def _save_state(root: Path, step: int, emb: SemanticEmbeddings, opt, gen: torch.Generator, meta: dict,
                history: list[dict]) -> Path:
    name = f"step_{step:07d}"
    with atomic_directory(root / name) as tmp:
        save_embeddings(tmp / "embeddings.safetensors", emb, meta | {"step": step})
        state = {"optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step}
        torch.save(state, tmp / "state.pt")
        (tmp / "history.json").write_text(json.dumps(history))
    write_latest(root, name)
    return root / name


def _resume(root: Path, emb: SemanticEmbeddings, opt, gen: torch.Generator) -> tuple[int, list[dict]]:
    ckpt = read_latest(root)
    if ckpt is None:
        return 0, []
    if not ckpt.is_dir():
        raise CheckpointError(f"{root / 'latest'} names {ckpt.name}, but {ckpt} does not exist")
    loaded, _ = load_embeddings(ckpt / "embeddings.safetensors", hidden_size=emb.dim)
    if loaded.names != emb.names or loaded.targets != emb.targets:
        raise CheckpointError(f"cannot resume from {ckpt}: it learned {loaded.names} -> {loaded.targets}, "
                              f"this run learns {emb.names} -> {emb.targets}")
    state = torch_load(ckpt / "state.pt")
    with torch.no_grad():
        emb.weight.copy_(loaded.weight)
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    history = json.loads((ckpt / "history.json").read_text()) if (ckpt / "history.json").is_file() else []
    log.info("resumed CASO training from %s (step %d)", ckpt, state["step"])
    return int(state["step"]), history


@torch.no_grad()
def one_step_probability(dit: nn.Module, process, prediction: str, classifier: nn.Module,
                         images: torch.Tensor, embeddings: SemanticEmbeddings,
                         guidance_scale: float = 10.0, t_min: float = 0.3, t_max: float = 0.7,
                         autoencoder: nn.Module | None = None, seed: int = 1234,
                         batch_size: int = 256) -> list[float]:
    """Mean classifier probability of each row's target on the one-step CFG estimates of ``images``
    (fixed t ~ U(t_min, t_max) and noise from ``seed``: the same draws for every row and every call).
    The training objective's quantity, measured on a fixed sample, before and after training."""
    net = EmbeddingDiT(dit)
    mf = guided_model_fn(net, process, prediction, guidance_scale)
    device = embeddings.weight.device
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
            z0_hat = one_step_x0(mf, z_t, t, embeddings.weight[k].expand(len(x), -1))
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
) -> CasoResult:
    """Learn one conditioning embedding per name (steering ``classifier`` toward ``targets``).

    Args:
        dit: a class-conditional DiT (frozen here).
        process, prediction: what the DiT was trained with (e.g. ``difftools.load(...)``'s).
        classifier: logits = classifier(image in [-1, 1]) (frozen here).
        images: training images [N, C, H, W] in [-1, 1] (pixels; encoded with ``autoencoder``).
        names, targets: one learned embedding per name; ``targets[k]`` is its classifier class.
        config: :class:`CasoConfig`.
        autoencoder: the DiT's autoencoder (None or identity for pixel models).
        out_dir: where checkpoints and the final ``embeddings.safetensors`` go; a run there with a
            ``checkpoints/latest`` pointer is resumed. None: nothing is written.
        meta: extra metadata stored in the embeddings file (base checkpoint, classifier, ...).
    """
    cfg = config or CasoConfig()
    device = torch.device(device)
    net = EmbeddingDiT(dit).to(device)
    _frozen(net)
    _frozen(classifier)
    _frozen(autoencoder)
    classifier.to(device)
    emb = SemanticEmbeddings(net.null_embedding(), names, targets).to(device)
    num_classes = getattr(classifier, "num_classes", None)
    if num_classes is not None and any(not 0 <= a < num_classes for a in emb.targets):
        raise ValueError(f"targets {emb.targets} out of range for a {num_classes}-class classifier")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got {tuple(images.shape)}")
    mf = guided_model_fn(net, process, prediction, cfg.guidance_scale)
    opt = torch.optim.AdamW([emb.weight], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    meta = {"config": asdict(cfg), **(meta or {})}

    root = Path(out_dir) / "checkpoints" if out_dir is not None else None
    step, history = (0, [])
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        step, history = _resume(root, emb, opt, gen)

    t0 = time.perf_counter()
    while step < cfg.max_steps:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        which = torch.randint(0, len(emb.names), (cfg.batch_size,), generator=gen)
        t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(cfg.batch_size, generator=gen)
        x = images[idx].to(device)
        z0 = autoencoder.encode(x) if autoencoder is not None else x
        eps = torch.randn(z0.shape, generator=gen).to(device)
        t = t.to(device)
        z_t = process.marginal(z0, eps, t).float()
        z0_hat = one_step_x0(mf, z_t, t, emb(which.to(device)))
        image = autoencoder.decode(z0_hat) if autoencoder is not None else z0_hat
        logits = classifier(image)
        loss, parts = caso_loss(logits, emb.target_tensor(which.to(device)), z0_hat, z0, cfg.lambda_rec,
                                cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        history.append({"step": step, "loss": float(loss.detach()), **parts})
        if cfg.log_every and step % cfg.log_every == 0:
            moved = (emb.weight.detach() - net.null_embedding().to(device)).norm(dim=1).mean()
            log.info("step %d  classifier loss %.4f  p_target %.3f  |e - e_null| %.3f", step, parts["cls"],
                     parts["p_target"], float(moved))
        if root is not None and cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            _save_state(root, step, emb, opt, gen, meta, history)
    seconds = time.perf_counter() - t0
    path = None
    if root is not None:
        _save_state(root, step, emb, opt, gen, meta, history)
        path = save_embeddings(Path(out_dir) / "embeddings.safetensors", emb, meta | {"step": step})
    return CasoResult(embeddings=emb, step=step, history=history, seconds=seconds, path=path)
