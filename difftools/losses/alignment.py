"""VAE-feature alignment (SRA², "Variational Autoencoder Self-Representation Alignment for Efficient
Diffusion Training", arXiv 2601.17830) as a loss module that wraps a denoising loss.

The DiT's token state after block ``depth`` is mapped token by token by a small MLP projector
``g`` to ``C_f p^2`` values, unpatchified to the latent grid [B, C_f, H, W], and regressed onto the
frozen autoencoder's feature map of the CLEAN image (by default the clean latent x0 the denoiser is
trained on, so the target costs nothing)::

    h      = DiT_{1..depth}(x_t, t, y)                    [B, N, D]   (same forward as the denoiser)
    f_hat  = unpatchify(g(h))                             [B, C_f, H, W]
    L      = L_denoise + weight * mean SmoothL1_beta(f_hat - f(x0))

    SmoothL1_beta(r) = 0.5 r^2 / beta   if |r| < beta   else |r| - 0.5 beta      (beta = 0.05)

at every t (no t-range restriction), weight 1.0. The paper prefers Smooth-L1 over MSE and negative
cosine (REPA's choice) and aligns an early block (block 2 of 12 for B-size models, deeper for L/XL).
g is 5 Linear layers with SiLU in between; default widths D -> D/2 -> D/4 -> D/8 -> D/8 -> C_f p^2.

Only the projector is new; it is trained with the DiT, stored in the training state, and never
exported to the EMA / sampling weights (the trainer exports ``model`` only). The denoising loss is
reused unchanged: we hand it a thin proxy of the model that asks for the hidden state on the same
forward call, so the alignment branch adds only the projector's cost (see ``projector_flops``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AlignmentProjector",
    "AlignedLoss",
    "smooth_l1",
    "unpatchify",
    "projector_flops",
    "alignment_flops_overhead",
]


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float = 0.05) -> torch.Tensor:
    """Mean Smooth-L1 (Huber / beta): 0.5 r^2/beta for |r| < beta, |r| - beta/2 otherwise."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="mean")


def unpatchify(tokens: torch.Tensor, channels: int, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, p*p*C] (row-major token grid, per token (p_row, p_col, C)) -> [B, C, g_h p, g_w p].

    Same layout as ``DiT.unpatchify`` (timm's PatchEmbed flattens the grid row-major).
    """
    B = tokens.shape[0]
    gh, gw = grid
    p = patch_size
    x = tokens.reshape(B, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, gh * p, gw * p)


def default_widths(hidden_size: int) -> list[int]:
    """Hidden widths of the 5-layer projector: D/2, D/4, D/8, D/8 (at least 8 each)."""
    return [max(8, hidden_size // k) for k in (2, 4, 8, 8)]


class AlignmentProjector(nn.Module):
    """Per-token MLP: Linear(D, w1) SiLU Linear(w1, w2) SiLU ... Linear(w4, C_f p^2)."""

    def __init__(
        self, hidden_size: int, out_channels: int, patch_size: int, widths: Sequence[int] | None = None
    ):
        super().__init__()
        widths = list(widths) if widths is not None else default_widths(hidden_size)
        dims = [hidden_size, *[int(w) for w in widths], out_channels * patch_size * patch_size]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.SiLU())
        self.mlp = nn.Sequential(*layers)
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.dims = dims

    def forward(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return unpatchify(self.mlp(hidden), self.out_channels, self.patch_size, grid)

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (multiply-add = 2), biases and SiLU left out."""
        return int(sum(2 * a * b for a, b in zip(self.dims[:-1], self.dims[1:], strict=True)))


def projector_flops(projector: AlignmentProjector, num_tokens: int) -> int:
    """Forward FLOPs of the alignment branch per image: num_tokens x the per-token MLP FLOPs."""
    return num_tokens * projector.flops_per_token()


def alignment_flops_overhead(model: nn.Module, projector: AlignmentProjector) -> float:
    """Analytic overhead = projector FLOPs / DiT forward FLOPs per image (both forward-only; the
    backward of each costs ~2x its forward, so the ratio also holds for a training step)."""
    return projector_flops(projector, model.num_tokens) / float(model.flops_per_image())


class _HiddenProbe(nn.Module):
    """Looks like the DiT to the wrapped denoising loss; its first call also returns the hidden state.

    Why a proxy: the alignment must use the hidden state of the very forward pass whose output the
    denoising loss scores (same x_t, t, label dropout), without a second forward and without
    depending on how the denoising loss samples t and noise.
    """

    def __init__(self, model: nn.Module, depth: int):
        super().__init__()
        self.model = model
        self.depth = depth
        self.hidden: torch.Tensor | None = None
        self.x_t: torch.Tensor | None = None

    def forward(self, x, t, y=None, **kw):
        if self.hidden is not None or kw.get("return_hidden") is not None:
            return self.model(x, t, y, **kw)
        pred, hidden = self.model(x, t, y, return_hidden=self.depth, **kw)
        self.hidden, self.x_t = hidden, x
        return pred

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


class AlignedLoss(nn.Module):
    """``loss_fn(model, x0, y, generator=None) -> (loss, logs)`` = denoising loss + SRA² alignment.

    Args:
        denoise: the wrapped loss module (e.g. ``DenoisingLoss``), same calling convention.
        hidden_size, patch_size: of the DiT (``model.hidden_size``, ``model.patch_size``).
        target_channels: channels of the target feature map (the latent channels for "latent").
        depth: 1-based block after which the hidden state is taken (paper: 2 of 12; 8 for L/XL).
        weight: lambda of the alignment term (paper: 1.0).
        beta: Smooth-L1 transition point (paper: 0.05).
        features: "latent" (target = the clean latent x0 itself) or "encoder" (the autoencoder's last
            encoder hidden map at latent resolution, computed from the decoded x0; needs ``vae``).
        widths: hidden widths of the projector (default D/2, D/4, D/8, D/8).
        vae: the frozen autoencoder (only for features="encoder").
    Logs: ``loss_denoise`` (the wrapped loss), ``loss_align`` (unweighted Smooth-L1), plus the
    wrapped loss's own logs.
    """

    def __init__(
        self,
        denoise: nn.Module,
        hidden_size: int,
        patch_size: int,
        target_channels: int,
        depth: int = 2,
        weight: float = 1.0,
        beta: float = 0.05,
        features: str = "latent",
        widths: Sequence[int] | None = None,
        vae=None,
    ):
        super().__init__()
        if features not in ("latent", "encoder"):
            raise ValueError(f"loss.align.features must be 'latent' or 'encoder', got {features!r}")
        if features == "encoder" and vae is None:
            raise ValueError("loss.align.features='encoder' needs the autoencoder (vae)")
        if depth < 1:
            raise ValueError(f"loss.align.depth must be >= 1, got {depth}")
        self.denoise = denoise
        self.depth = int(depth)
        self.weight = float(weight)
        self.beta = float(beta)
        self.features = features
        self.projector = AlignmentProjector(hidden_size, target_channels, patch_size, widths)
        # Keep the autoencoder out of this module's parameters/state: it is frozen and saved elsewhere.
        self._vae = [vae]

    def target(self, x0: torch.Tensor) -> torch.Tensor:
        """Feature map of the clean sample that the projection is regressed onto (no gradient)."""
        if self.features == "latent":
            return x0.detach()
        vae = self._vae[0]
        with torch.no_grad():
            return vae.features(vae.decode(x0).clamp(-1, 1), "encoder")

    def align_loss(self, hidden: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Smooth-L1 between the projected hidden tokens and the target features."""
        target = self.target(x0)
        p = self.projector.patch_size
        grid = (target.shape[-2] // p, target.shape[-1] // p)
        if grid[0] * grid[1] != hidden.shape[1]:
            raise ValueError(
                f"hidden has {hidden.shape[1]} tokens but the target {tuple(target.shape)} "
                f"with patch {p} gives a {grid[0]}x{grid[1]} grid"
            )
        return smooth_l1(self.projector(hidden, grid), target, self.beta)

    def forward(self, model: nn.Module, x0: torch.Tensor, y=None, generator=None):
        if self.depth > getattr(model, "depth", self.depth):
            raise ValueError(f"loss.align.depth={self.depth} exceeds the model depth {model.depth}")
        probe = _HiddenProbe(model, self.depth)
        loss_denoise, logs = self.denoise(probe, x0, y, generator=generator)
        if probe.hidden is None:
            raise RuntimeError("the wrapped denoising loss never called the model")
        loss_align = self.align_loss(probe.hidden, x0)
        logs = dict(logs)
        logs["loss_denoise"] = loss_denoise.detach()
        logs["loss_align"] = loss_align.detach()
        loss = loss_denoise + self.weight * loss_align
        logs["loss"] = loss.detach()
        return loss, logs

    def flops_overhead(self, model: nn.Module) -> float:
        """Analytic alignment-branch FLOPs / DiT forward FLOPs per image."""
        return alignment_flops_overhead(model, self.projector)
