"""CASO: classifier-guided semantic embedding optimisation (Chang et al. 2025, arXiv 2505.14254).

CASO learns one conditioning embedding e_a per value a of an attribute; the diffusion model, the
autoencoder and the attribute classifier F stay frozen. In Stable Diffusion e_a is a token slot of
the empty prompt; in a class-conditional DiT the conditioning is the label embedding that is added
to the time embedding, c = t_emb(t) + y_emb (see :mod:`difftools.models.dit`). The slots e_a can
take here (a free vector, or a new label-table row in the span of the trained rows) are in
:mod:`difftools.editing.embeddings`; both start at the null-class row (the DiT's "empty prompt").

Per training image x (latent z0 = E(x); the identity for pixel models), with t drawn from
[t_min, t_max] (or the released trainer's one fixed time, :func:`released_train_time`) and
eps ~ N(0, I):

    z_t      = alpha_t z0 + sigma_t eps
    P        = P(z_t, t; e_null) + w (P(z_t, t; e_a) - P(z_t, t; e_null))     CFG, w = 10 in the paper
    z0_hat   = x0 of P at (z_t, t)                                            one-step estimate
    L(e_a)   = CE(F(D(z0_hat)), a) + lambda_rec ||z0_hat - z0||^2

``loss="prob_mse"`` uses (1 - softmax(F(.))_a)^2 instead of the cross-entropy: the released
trainer's squared error between a sigmoid attribute score and the target value, which for a
two-class softmax classifier is exactly this. The released trainer multiplies the reconstruction
term by 0; ``lambda_rec`` defaults to 0 here as well and is exposed.

This module holds the pieces (the conditioning wrapper, the one-step estimate, the loss, the
released training time); :mod:`difftools.editing.optimize` is the training objective and
:mod:`difftools.editing.inversion` the editing procedure.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from samplers.guidance import CFG
from samplers.model import ModelFn

__all__ = [
    "EmbeddingDiT",
    "LOSSES",
    "RELEASED_STEP",
    "caso_loss",
    "guided_model_fn",
    "one_step_x0",
    "released_train_time",
    "sd_alphas_cumprod",
]

LOSSES = ("ce", "prob_mse")


class EmbeddingDiT(nn.Module):
    """A class-conditional DiT that takes its conditioning embedding directly.

    ``net(x, t, y=None, y_embed=None)``: with ``y_embed`` ([B, D] or [D]) the conditioning vector is
    c = t_emb(t) + y_embed; without it, c = t_emb(t) + table[y] (the null row when y is None). The
    computation is the DiT's own forward, block by block, so ``net(x, t, y_embed=table[y])`` equals
    ``dit(x, t, y)`` exactly in eval mode (tested). The wrapper never applies label dropout.
    The wrapped DiT's parameters are not touched (callers freeze them).
    """

    def __init__(self, dit: nn.Module):
        super().__init__()
        if getattr(dit, "y_embedder", None) is None:
            raise ValueError("CASO needs a class-conditional DiT (num_classes > 0): an unconditional DiT has "
                             "no label-embedding space to learn embeddings in")
        self.dit = dit

    @property
    def hidden_size(self) -> int:
        return int(self.dit.hidden_size)

    @property
    def null_class(self) -> int:
        return int(self.dit.null_class)

    def label_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """Rows of the label table (no dropout): [B] -> [B, D]."""
        return self.dit.y_embedder.embedding_table(y)

    def label_table(self) -> torch.Tensor:
        """The label table [num_classes + 1, D] (class rows, then the null row), detached."""
        return self.dit.y_embedder.embedding_table.weight.detach().clone()

    def null_embedding(self) -> torch.Tensor:
        """The null ("empty prompt") row [D], detached."""
        return self.dit.y_embedder.embedding_table.weight[self.null_class].detach().clone()

    def check_embedding(self, y_embed: torch.Tensor, batch: int) -> torch.Tensor:
        if y_embed.shape[-1] != self.hidden_size or y_embed.ndim not in (1, 2):
            raise ValueError(f"y_embed has shape {tuple(y_embed.shape)}; the DiT's conditioning space is "
                             f"[B, {self.hidden_size}] (or [{self.hidden_size}] for all samples)")
        if y_embed.ndim == 2 and y_embed.shape[0] not in (1, batch):
            raise ValueError(f"y_embed has {y_embed.shape[0]} rows for a batch of {batch}")
        return y_embed.expand(batch, -1) if y_embed.ndim == 1 or y_embed.shape[0] == 1 else y_embed

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                y_embed: torch.Tensor | None = None) -> torch.Tensor:
        dit = self.dit
        if y_embed is None:
            if y is None:
                y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
            y_embed = self.label_embedding(y)
        elif y is not None:
            raise ValueError("pass either y (labels) or y_embed (conditioning embeddings), not both")
        y_embed = self.check_embedding(y_embed, x.shape[0])
        h = dit.x_embedder(x)
        h = h + (dit.pos_embed.to(h.dtype) if dit.lowp_residual else dit.pos_embed)
        c = dit.t_embedder(t) + y_embed
        for block in dit.blocks:
            h = block(h, c)
        return dit.unpatchify(dit.final_layer(h, c))


def guided_model_fn(net: EmbeddingDiT, process, prediction: str, scale: float,
                    null: torch.Tensor | None = None) -> ModelFn:
    """CFG over the conditioning embedding: cond = ``y_embed`` passed at call time, uncond = the null
    embedding. ``scale=1`` returns the plain ModelFn (one pass, conditional only)."""
    mf = ModelFn(net, process, prediction)
    if float(scale) == 1.0:
        return mf
    null = net.null_embedding() if null is None else null
    return CFG(mf, scale, uncond={"y_embed": null[None]})


def one_step_x0(model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, y_embed: torch.Tensor) -> torch.Tensor:
    """x0_hat(x_t, t) of the (guided) model under conditioning ``y_embed``, differentiable in y_embed:
    for eps models x0_hat = (x_t - sigma_t eps_hat) / alpha_t, for flow models x_t - t v_hat, etc."""
    return model_fn.predict(x_t, t, y_embed=y_embed).x0


def caso_loss(logits: torch.Tensor, target: torch.Tensor, x0_pred: torch.Tensor | None = None,
              x0_ref: torch.Tensor | None = None, lambda_rec: float = 0.0,
              kind: str = "ce") -> tuple[torch.Tensor, dict]:
    """Classifier term toward ``target`` + ``lambda_rec`` * mean squared reconstruction error.

    ``kind="ce"``: cross-entropy -log softmax(logits)_a (the paper's classifier loss);
    ``kind="prob_mse"``: (1 - softmax(logits)_a)^2 (the released trainer's form).
    Returns (loss, {"cls": ..., "rec": ..., "p_target": mean target probability}).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown CASO loss {kind!r}; choose one of {LOSSES}")
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_a = logp.gather(1, target[:, None]).squeeze(1)
    p_a = logp_a.exp()
    cls = -logp_a.mean() if kind == "ce" else (1.0 - p_a).pow(2).mean()
    rec = torch.zeros((), device=logits.device)
    if lambda_rec:
        if x0_pred is None or x0_ref is None:
            raise ValueError("lambda_rec > 0 needs x0_pred and x0_ref")
        rec = (x0_pred.float() - x0_ref.float()).pow(2).mean()
    loss = cls + float(lambda_rec) * rec
    if not torch.isfinite(loss):
        raise FloatingPointError(f"CASO loss is not finite (classifier term {cls.item()}, "
                                 f"reconstruction term {rec.item()}): lower the learning rate or w")
    parts = {"cls": float(cls.detach()), "rec": float(rec.detach()), "p_target": float(p_a.mean().detach())}
    return loss, parts


# ------------------------------------------------------------------ the released trainer's time
#: the released trainer's training timestep: all_times[-30] of its 50-step DDIM inversion of SD v1.5
#: (PNDM timesteps 1, 21, ..., 981), i.e. DDPM step 401 of 1000 (trainer.py, utils.ddim_forward_loop)
RELEASED_STEP = 401


def sd_alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """alpha_bar_k of Stable Diffusion v1's "scaled_linear" DDPM schedule (float64):
    beta_k = (sqrt(beta_start) + k / (N - 1) (sqrt(beta_end) - sqrt(beta_start)))^2,
    alpha_bar_k = prod_{j <= k} (1 - beta_j)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def released_train_time(process, step: int = RELEASED_STEP) -> float:
    """The time t of ``process`` with the signal-to-noise ratio of the released trainer's fixed
    timestep: SNR = alpha_bar_k / (1 - alpha_bar_k) at k = ``step`` of SD v1's schedule (0.7327 at
    k = 401), matched through half the log-SNR, lambda(t) = log(alpha_t / sigma_t) = log(SNR) / 2.
    For a flow model (alpha = 1 - t, sigma = t): t = 1 / (1 + sqrt(SNR)) = 0.5388."""
    ac = sd_alphas_cumprod()
    if not 0 <= step < ac.numel():
        raise ValueError(f"step must be a DDPM step in [0, {ac.numel()}), got {step}")
    snr = float(ac[step] / (1.0 - ac[step]))
    return float(process.t_of_lambda(torch.tensor(0.5 * math.log(snr), dtype=torch.float64)))
