"""The autoencoder's training loss: reconstruction + KL (the LDM recipe without its perceptual and
GAN terms; Rombach et al. 2022, arXiv 2112.10752):

    z ~ q(z|x),   L = mean |x - D(z)|  (or mean (x - D(z))^2)  +  kl_weight * KL(q(z|x) || N(0, I)) / (C H W)

The KL is summed over latent elements and averaged over the batch, then divided by the number of
image elements C H W (LDM's per-element convention, so ``kl_weight`` does not depend on the image
size). A deterministic autoencoder (diffusers ``AutoencoderTiny``) has no KL term. The
reconstruction and the KL are computed in fp32 whatever the autocast.
"""

from __future__ import annotations

import torch
import torch.nn as nn

RECONSTRUCTIONS = ("l1", "l2")


class AutoencoderLoss(nn.Module):
    """``loss_fn(model, x0, y=None, generator=None) -> (loss, logs)``; ``model(x, sample=True,
    generator=...)`` returns ``(x_hat, kl per image or None)`` (e.g.
    :class:`~difftools.models.autoencoders.trainable.TrainableAutoencoder`); z is drawn from
    ``generator``. Logs: ``rec``, ``kl`` (0 without a KL term) and ``batch_psnr`` (dB, of the
    sampled reconstruction).

    Args:
        recon: ``l1`` (mean absolute error) or ``l2`` (mean squared error).
        kl_weight: weight of the per-element KL above.
    """

    def __init__(self, recon: str = "l1", kl_weight: float = 1e-6):
        super().__init__()
        if recon not in RECONSTRUCTIONS:
            raise ValueError(f"train.recon must be one of {RECONSTRUCTIONS}, got {recon!r}")
        self.recon, self.kl_weight = recon, float(kl_weight)

    def forward(self, model: nn.Module, x0: torch.Tensor, y=None, generator: torch.Generator | None = None):
        x_hat, kl = model(x0, sample=True, generator=generator)
        x_hat = x_hat.float()
        err = x_hat - x0
        rec = err.abs().mean() if self.recon == "l1" else err.pow(2).mean()
        loss, kl_term = rec, torch.zeros((), device=x0.device)
        if kl is not None:
            kl_term = kl.float().mean() / x0[0].numel()
            loss = rec + self.kl_weight * kl_term
        with torch.no_grad():
            mse = (x_hat.clamp(-1, 1) - x0).pow(2).mean()
            batch_psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
        return loss, {"rec": rec.detach(), "kl": kl_term.detach(), "batch_psnr": batch_psnr}
