"""VAE-feature alignment (SRA², "Variational Autoencoder Self-Representation Alignment for Efficient
Diffusion Training", Wang et al., CVPR 2026, arXiv 2601.17830; v1 title "VAE-REPA") as a loss module
that wraps a denoising loss.

The DiT's token state after block ``depth`` is mapped token by token by an MLP projector ``g`` to
``C_f p^2`` values, unpatchified to the latent grid [B, C_f, H, W], and regressed onto the frozen
autoencoder's feature map of the CLEAN image (by default the clean latent x0 the denoiser is trained
on, so the target costs nothing)::

    h      = DiT_{1..depth}(x_t, t, y)                    [B, N, D]   (same forward as the denoiser)
    f_hat  = unpatchify(g(h))                             [B, C_f, H, W]
    L      = L_denoise + weight * mean SmoothL1_beta(f_hat - f(x0))

    SmoothL1_beta(r) = 0.5 r^2 / beta   if |r| < beta   else |r| - 0.5 beta      (beta = 0.05)

at every t, weight 1.0. ``g`` is 5 Linear layers with SiLU in between, hidden widths 2D by default
(:func:`default_widths`: about 18.6 M parameters and +4.0 % forward FLOPs on DiT-XL/2 at 256 tokens,
the size the paper's cost table gives for SiT-XL/2). The block follows the model depth
(:func:`default_align_depth`: block 2 of 12, block 8 of 24-28). docs/alignment.md lists which of
these choices the readable parts of the paper confirm.

Only the projector is new; it is trained with the DiT, stored in the training state, and never
exported to the EMA / sampling weights (the trainer exports ``model`` only). The denoising loss is
reused unchanged: we hand it a thin proxy of the model that asks for the hidden state on the same
forward call, so the alignment branch adds only the projector's cost (see
:meth:`AlignedLoss.flops_overhead`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AlignmentProjector",
    "AlignedLoss",
    "ProjectorShapeError",
    "PAPER_WIDTH_MULT",
    "smooth_l1",
    "unpatchify",
    "default_widths",
    "default_align_depth",
    "build_aligned_loss",
    "projector_flops",
    "alignment_flops_overhead",
]

#: hidden width of the projector in units of the DiT width D. 2D gives 18.6 M parameters and +4.0 %
#: forward FLOPs on DiT-XL/2 (D = 1152, 256 tokens), the paper's head size for SiT-XL/2.
PAPER_WIDTH_MULT = 2.0
#: Linear layers of the projector (the paper's "5-layer MLP")
PROJECTOR_LAYERS = 5


class ProjectorShapeError(ValueError):
    """A saved alignment projector's layer sizes differ from the one this config builds."""


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


def default_widths(hidden_size: int, mult: float = PAPER_WIDTH_MULT) -> list[int]:
    """Hidden widths of the 5-layer projector: ``mult * D`` for each of the 4 hidden layers.

    The default ``mult = 2`` reproduces the paper's head on DiT-XL/2 (18.6 M parameters, +4.0 %
    forward FLOPs); the head grows with D like the DiT's own MLP (4D wide) does, so on the 12-block
    models it costs about 9-10 % of the forward FLOPs (docs/alignment.md, "Head size").
    """
    if mult <= 0:
        raise ValueError(f"projector width multiplier must be > 0, got {mult}")
    return [max(8, int(round(mult * hidden_size)))] * (PROJECTOR_LAYERS - 1)


def default_align_depth(num_blocks: int) -> int:
    """The block whose output is aligned, from the model depth: 2 for <= 12 blocks (the paper's
    choice for B-size models), 8 for >= 24 blocks (L/XL), linearly in between (rounded)."""
    if num_blocks < 1:
        raise ValueError(f"the model has {num_blocks} blocks; alignment needs at least one")
    if num_blocks <= 12:
        return min(2, num_blocks)
    if num_blocks >= 24:
        return 8
    return int(round(2 + 6 * (num_blocks - 12) / 12))


class AlignmentProjector(nn.Module):
    """Per-token MLP: Linear(D, w1) SiLU Linear(w1, w2) SiLU ... Linear(w4, C_f p^2)."""

    def __init__(
        self, hidden_size: int, out_channels: int, patch_size: int, widths: Sequence[int] | None = None
    ):
        super().__init__()
        widths = list(widths) if widths is not None else default_widths(hidden_size)
        if any(int(w) < 1 for w in widths):
            raise ValueError(f"loss.align.widths must be positive integers, got {widths}")
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

    @property
    def widths(self) -> list[int]:
        return self.dims[1:-1]

    def forward(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return unpatchify(self.mlp(hidden), self.out_channels, self.patch_size, grid)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (multiply-add = 2), biases and SiLU left out."""
        return int(sum(2 * a * b for a, b in zip(self.dims[:-1], self.dims[1:], strict=True)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A projector saved with other widths (e.g. a run made with the earlier D/2..D/8 default)
        # would otherwise fail deep inside torch with a bare "size mismatch"; say which widths the
        # checkpoint holds and how to rebuild them.
        linears = [(i, m) for i, m in enumerate(self.mlp) if isinstance(m, nn.Linear)]
        saved = [state_dict.get(f"{prefix}mlp.{i}.weight") for i, _ in linears]
        if all(w is not None for w in saved):
            saved_dims = [int(saved[0].shape[1])] + [int(w.shape[0]) for w in saved]
            if saved_dims != self.dims:
                raise ProjectorShapeError(
                    f"the saved alignment projector has layer sizes {saved_dims}, this config builds "
                    f"{self.dims}: set loss.align.widths={saved_dims[1:-1]} to load it (the default "
                    "widths became 2D in issue 14; earlier runs used D/2, D/4, D/8, D/8)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def projector_flops(projector: AlignmentProjector, num_tokens: int) -> int:
    """Forward FLOPs of the alignment branch per image: num_tokens x the per-token MLP FLOPs."""
    return num_tokens * projector.flops_per_token()


def alignment_flops_overhead(model: nn.Module, projector: AlignmentProjector, target_flops: int = 0) -> float:
    """Analytic FLOPs overhead of one training step, per image::

        (3 P + T) / (3 F)

    P, F: forward FLOPs of the projector and of the DiT (each trains at ~3x its forward: backward =
    2x); T: forward-only FLOPs of computing the target (0 for the clean latent; the frozen decoder +
    encoder for ``features="encoder"``)."""
    p = projector_flops(projector, model.num_tokens)
    return (3 * p + target_flops) / (3.0 * model.flops_per_image())


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
        depth: 1-based block after which the hidden state is taken (:func:`default_align_depth`
            gives the paper's choice for a model depth).
        weight: lambda of the alignment term (paper: 1.0).
        beta: Smooth-L1 transition point (paper: 0.05).
        features: "latent" (target = the clean latent x0 itself; the paper) or "encoder" (an
            extension, not the paper: the autoencoder's last encoder hidden map at latent
            resolution, computed from the decoded x0 at every step; needs ``vae``).
        widths: hidden widths of the projector (default :func:`default_widths`: 2D each).
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
        if depth is None or int(depth) < 1:
            raise ValueError(f"loss.align.depth must be >= 1, got {depth}")
        self.denoise = denoise
        self.depth = int(depth)
        self.weight = float(weight)
        self.beta = float(beta)
        self.features = features
        self.projector = AlignmentProjector(hidden_size, target_channels, patch_size, widths)
        # Keep the autoencoder out of this module's parameters/state: it is frozen and saved elsewhere.
        self._vae = [vae]
        self._target_flops: dict[tuple, int] = {}

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

    def target_flops_per_image(self, latent_shape: Sequence[int]) -> int:
        """Forward FLOPs of computing one image's target: 0 for ``features="latent"`` (the training
        input itself); for ``"encoder"`` the decoder + encoder pass, counted once with
        ``torch.utils.flop_counter`` on a latent of ``latent_shape`` (C, H, W)."""
        if self.features == "latent":
            return 0
        key = tuple(int(s) for s in latent_shape)
        if key not in self._target_flops:
            from torch.utils.flop_counter import FlopCounterMode

            vae = self._vae[0]
            params = list(vae.parameters()) if isinstance(vae, nn.Module) else []
            device = params[0].device if params else torch.device("cpu")
            counter = FlopCounterMode(display=False)
            with counter:
                self.target(torch.zeros(1, *key, device=device))
            self._target_flops[key] = int(counter.get_total_flops())
        return self._target_flops[key]

    def flops_overhead(self, model: nn.Module) -> float:
        """Analytic FLOPs of the alignment branch per training step relative to the DiT's
        (:func:`alignment_flops_overhead`), the target's cost included."""
        shape = (model.in_channels, model.input_size, model.input_size)
        return alignment_flops_overhead(model, self.projector, self.target_flops_per_image(shape))

    def describe(self, model: nn.Module | None = None) -> dict:
        """What the head is (for logs and result files)."""
        out = {"depth": self.depth, "widths": self.projector.widths, "features": self.features,
               "weight": self.weight, "beta": self.beta, "params": self.projector.num_parameters()}
        if model is not None:
            out["flops_overhead"] = self.flops_overhead(model)
        return out


def build_aligned_loss(denoise: nn.Module, align: Mapping, model: nn.Module, vae=None) -> AlignedLoss:
    """The ``loss.align`` node (already checked) around ``denoise`` for ``model``: ``depth: null``
    -> :func:`default_align_depth` of the model's block count; ``widths: null`` -> 2D each."""
    features = align.get("features", "latent")
    if features == "encoder":
        if vae is None:
            raise ValueError("loss.align.features='encoder' needs the autoencoder (vae)")
        target_channels = vae.feature_channels("encoder")
    else:
        target_channels = model.in_channels
    depth = align.get("depth")
    if depth is None:
        depth = default_align_depth(int(model.depth))
    widths = align.get("widths")
    return AlignedLoss(denoise, hidden_size=model.hidden_size, patch_size=model.patch_size,
                       target_channels=target_channels, depth=int(depth), weight=float(align["weight"]),
                       beta=float(align.get("beta", 0.05)), features=features,
                       widths=None if widths is None else [int(w) for w in widths], vae=vae)
