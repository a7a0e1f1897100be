"""DiT: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, arXiv 2212.09748).

The whole network in one file:

    tokens = PatchEmbed(x) + pos2d                                   x [B, C, H, W] -> [B, N, D]
    c      = TimestepEmbed(1000 t) + LabelEmbed(y)                   [B, D]
    block:   shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))
             h = h + gate1 * Attn(LN(h) * (1 + scale1) + shift1)
             h = h + gate2 * MLP (LN(h) * (1 + scale2) + shift2)
    out    = unpatchify(Linear(LN(h) * (1 + scale) + shift))         [B, C_out, H, W]

adaLN-Zero: the Linear that produces (shift, scale, gate) of every block starts at zero, so every
gate is 0 and each block is the identity map at initialisation; the final Linear starts at zero,
so the initial prediction is exactly 0. The paper (Sec. 3.2, Fig. 5) finds this the best of the
conditioning variants it tried.

Layers come from timm (``PatchEmbed``, ``Mlp``); attention goes through
:func:`difftools.nn.attention.attention` so the backend (sdpa | xformers | math | auto) is a
constructor argument. Parameter names follow facebookresearch/DiT's ``models.py`` (``x_embedder``,
``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.i.attn.qkv``, ``adaLN_modulation``,
``final_layer``); ``pos_embed`` is a non-persistent buffer recomputed from the config with the same
formula. Unlike the original, the time input is continuous t in [0, 1] (t = 0 data, t = 1 noise);
the embedding sees 1000 t, i.e. the original's integer timestep scale. :mod:`difftools.interop`
converts facebookresearch/DiT, SiT and diffusers checkpoints exactly, through the options listed
in :class:`DiT` (time map, frequencies, norm eps, learned-sigma channels).

Speed notes (for bf16 training on H100): q, k and v come from one fused Linear; attention runs
through SDPA's flash kernel in bf16; tokens stay in a contiguous [B, N, D] layout end to end; the
forward has no host synchronisation (label dropout is a ``torch.where``, no data-dependent
branches), so it compiles into few graphs and overlaps with the optimizer. The memory-bound steps
between the matmuls (gated residual, layer norm, modulation) run as one fused kernel each way
(:mod:`difftools.nn.fused`, ``norm_kernels="auto"``: Triton on CUDA, plain torch ops elsewhere):
:meth:`DiT.forward` computes every block's modulation up front and chains the blocks so that each
layer norm is fused with the residual update before it, also across block boundaries; the
normalised tokens are recomputed in the backward instead of stored. ``lowp_residual=True`` trades
the fp32 residual stream for bf16 (opt-in; see :class:`DiT`); ``scripts/bench_train.py`` times the
variants beside the DiT reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Mlp

from difftools.models.registry import register_rebuildable
from difftools.nn.attention import BACKENDS, attention
from difftools.nn.fused import IMPLS as NORM_KERNELS
from difftools.nn.fused import gated_residual, modulate, norm_modulate, residual_norm_modulate, resolve_impl

__all__ = ["DiT", "DiTBlock", "FinalLayer", "PRESETS", "dit_from_preset", "gated_residual", "modulate",
           "parse_preset", "sincos_pos_embed_2d"]

#: name -> (hidden_size, depth, num_heads); combine with a patch size: "DiT-S/2", "DiT-B/4", ...
PRESETS: dict[str, tuple[int, int, int]] = {
    "DiT-T": (192, 12, 3),
    "DiT-S": (384, 12, 6),
    "DiT-B": (768, 12, 12),
    "DiT-L": (1024, 24, 16),
    "DiT-XL": (1152, 28, 16),
}
PATCH_SIZES = (2, 4, 8)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_size**2, dim] (MAE, arXiv 2111.06377; used by DiT).

    Half of the channels encode the column index w, the other half the row index h, each as
    [sin(pos * omega_k), cos(pos * omega_k)] with omega_k = 10000^(-k / (dim/4)), k < dim/4.
    Tokens are in row-major order (token index = h * grid_size + w), as PatchEmbed flattens them.
    """
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Continuous t in [0, 1] -> sinusoidal features of s = time_scale t + time_shift -> 2-layer MLP.

    emb(s)_k = cos(s * f_k) for k < F/2 and sin(s * f_(k-F/2)) after, with
    f_k = max_period^(-k / (F/2 - freq_shift)). The defaults (s = 1000 t, freq_shift 0) keep the
    lowest frequencies distinguishable over [0, 1], as over the integer timesteps 0..999 that
    DDPM-style models see. The other settings reproduce released models exactly (docs/interop.md):

    * facebookresearch/DiT embeds its integer timestep k, which sits at t = (k + 1) / 1000 in our
      discrete VP process: s = 1000 t - 1 (``time_shift=-1``).
    * SiT embeds its own time s in [0, 1] with data at s = 1, so s = 1 - t
      (``time_scale=-1, time_shift=1``).
    * diffusers' ``DiTTransformer2DModel`` divides the exponent by F/2 - 1 instead of F/2
      (its ``Timesteps(downscale_freq_shift=1)``): ``freq_shift=1``.
    """

    def __init__(
        self,
        hidden_size: int,
        frequency_size: int = 256,
        max_period: float = 10000.0,
        time_scale: float = 1000.0,
        time_shift: float = 0.0,
        freq_shift: int = 0,
    ):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.time_shift = time_shift
        half = frequency_size // 2
        if not 0 <= freq_shift < half:
            raise ValueError(f"freq_shift must be in [0, {half}), got {freq_shift}")
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift)
        freqs = torch.exp(exponent)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # fp32 angles: bf16 has 8 mantissa bits, far too few for 1000 t * f_k
        s = t.float() * self.time_scale
        if self.time_shift:
            s = s + self.time_shift
        args = s[:, None] * self.freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row ``num_classes`` is the learned null ("unconditional") class.

    In training mode each label is replaced by the null class with probability ``dropout_prob``
    (classifier-free guidance training, Ho & Salimans, arXiv 2207.12598).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; the kernel is chosen by ``backend``."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # [B, N, 3, H, Dh] -> 3 x [B, H, N, Dh] as strided views (no copy; SDPA/flash accept them)
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (see the module docstring for the equations)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "auto",
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(
            hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh")
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The block on its own: x [B, N, D] -> x [B, N, D] (the equations of the module docstring)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = gated_residual(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))
        return gated_residual(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))

    def forward_chained(self, x: torch.Tensor, a: torch.Tensor, gate1: torch.Tensor, shift2: torch.Tensor,
                        scale2: torch.Tensor, gate2: torch.Tensor, next_shift: torch.Tensor,
                        next_scale: torch.Tensor, next_eps: float, impl: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block inside :meth:`DiT.forward`'s chain: takes the residual stream x and a, the
        already-modulated norm1(x), and returns the new x and the NEXT layer's modulated norm of it
        (``next_shift``, ``next_scale``, ``next_eps``: the next block's norm1, or the final layer's),
        so that each layer norm runs fused with the residual update before it
        (:func:`difftools.nn.fused.residual_norm_modulate`). Same result as :meth:`forward`."""
        x, a = residual_norm_modulate(x, gate1, self.attn(a), shift2, scale2, self.norm2.eps, impl)
        return residual_norm_modulate(x, gate2, self.mlp(a), next_shift, next_scale, next_eps, impl)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to p*p*C_out values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@register_rebuildable
class DiT(nn.Module):
    """Diffusion transformer on [B, C, H, W] images or latents, class-conditional or not.

    ``model(x, t, y=None, return_hidden=None)``: t [B] continuous in [0, 1]; y [B] long labels, where
    ``y=None`` or the label ``num_classes`` (= ``model.null_class``) means unconditional;
    ``num_classes=0`` builds an unconditional model (y is ignored). Returns the prediction
    [B, C_out, H, W] (C_out = C, or 2C with ``learn_sigma`` unless ``return_sigma=False``), or
    ``(prediction, hidden)`` where hidden [B, N, D] is the token state after block ``return_hidden``
    (1-based).

    ``lowp_residual=True`` (opt-in, for throughput) keeps the token stream h between blocks in the
    dtype of the patch embedding's output, i.e. bf16 under bf16 autocast (without autocast nothing
    changes). That halves the memory traffic of every residual add and layer norm, but each of the
    2 * depth residual updates then rounds h to bf16's 8-bit mantissa (relative error ~4e-3 per add)
    instead of fp32's; the default keeps h in fp32, as the DiT reference trains it.

    ``norm_kernels``: how the residual update + layer norm + modulation steps run: ``auto`` (the fused
    Triton kernels of :mod:`difftools.nn.fused` for CUDA tensors, plain torch ops elsewhere),
    ``triton`` (an error where they cannot run) or ``torch`` (the plain ops everywhere, e.g. to let
    ``torch.compile`` fuse them itself). Same function either way; the torch path is the reference.

    Options for checkpoints made elsewhere (:mod:`difftools.interop`; the defaults are this toolkit's
    own convention and change nothing):

    * ``time_scale``, ``time_shift``: the time embedding sees s = time_scale t + time_shift
      (default 1000 t); facebookresearch/DiT is (1000, -1), SiT (-1, 1). See :class:`TimestepEmbedder`.
    * ``time_freq_shift``: 1 for the frequencies of diffusers' ``DiTTransformer2DModel``.
    * ``mlp_norm_eps``: eps of the layer norm before each block's MLP; diffusers'
      ``DiTTransformer2DModel`` sets it from its ``norm_eps`` (1e-5 by default; all other norms
      here and there use 1e-6, as facebookresearch/DiT does everywhere).
    * ``return_sigma=False`` with ``learn_sigma=True``: keep the learned-variance channels' weights
      (so the model exports back unchanged) but return only the first C channels, the prediction a
      sampler uses (SiT's forward does the same).
    """

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        patch_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        attn_backend: str = "auto",
        grad_checkpointing: bool = False,
        lowp_residual: bool = False,
        time_scale: float = 1000.0,
        time_shift: float = 0.0,
        time_freq_shift: int = 0,
        mlp_norm_eps: float = 1e-6,
        return_sigma: bool = True,
        norm_kernels: str = "auto",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"unknown attn_backend {attn_backend!r}; choose one of {BACKENDS}")
        if norm_kernels not in NORM_KERNELS:
            raise ValueError(f"unknown norm_kernels {norm_kernels!r}; choose one of {NORM_KERNELS}")
        self._config = dict(
            input_size=input_size,
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
            learn_sigma=learn_sigma,
            attn_backend=attn_backend,
            grad_checkpointing=grad_checkpointing,
            lowp_residual=lowp_residual,
            time_scale=time_scale,
            time_shift=time_shift,
            time_freq_shift=time_freq_shift,
            mlp_norm_eps=mlp_norm_eps,
            return_sigma=return_sigma,
            norm_kernels=norm_kernels,
        )
        self.input_size = input_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        # channels forward() returns: all of them, or the prediction alone (return_sigma=False)
        self.returned_channels = self.out_channels if return_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.null_class = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.lowp_residual = lowp_residual
        self.norm_kernels = norm_kernels
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(
            hidden_size, time_scale=time_scale, time_shift=time_shift, freq_shift=time_freq_shift
        )
        self.y_embedder = (
            LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        )
        # fixed, not learned: recomputed from the config, so not stored in checkpoints
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None], persistent=False
        )
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend, mlp_norm_eps) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ initialisation
    def initialize_weights(self) -> None:
        """DiT's initialisation, each choice with its reason."""
        # Linear layers: Xavier-uniform weights, zero biases (the ViT / JAX convention DiT follows),
        # which keeps activations' variance roughly constant through each projection.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding: a strided conv is a Linear on flattened patches; initialise it as one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Embeddings of labels and time: small normal weights (std 0.02), so the conditioning vector
        # c starts small and the zero-initialised modulation below dominates early training.
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero modulation => shift = scale = gate = 0 => every residual branch is
        # multiplied by gate 0, so each block is exactly the identity at initialisation.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Final layer: zero modulation and zero output projection => the initial prediction is 0
        # (for eps / velocity targets the loss starts at E|target|^2 with a well-scaled gradient).
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ helpers
    def config(self) -> dict:
        """Constructor arguments: ``DiT(**model.config())`` rebuilds this architecture."""
        return dict(self._config)

    def set_attn_backend(self, backend: str) -> None:
        """Switch every block's attention kernel (sdpa | xformers | math | auto)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attn_backend {backend!r}; choose one of {BACKENDS}")
        self._config["attn_backend"] = backend
        for block in self.blocks:
            block.attn.backend = backend

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] tokens (row-major grid, per token (p_row, p_col, C)) -> [B, C, H, W]."""
        B, g, p, C = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # B, C, g_row, p_row, g_col, p_col
        return x.reshape(B, C, g * p, g * p)

    def flops_per_image(self) -> int:
        """Forward FLOPs for one image (a multiply-add counts 2): all matmuls incl. attention scores.

        Elementwise ops (norms, modulation, softmax, GELU) are left out, as in the usual MFU
        accounting; training costs ~3x this (backward = 2x forward).
        """
        N, D, L = self.num_tokens, self.hidden_size, self.depth
        p2c_in, p2c_out = self.patch_size**2 * self.in_channels, self.patch_size**2 * self.out_channels
        hidden_mlp = int(D * self.mlp_ratio)
        per_block = (
            2 * N * D * 3 * D  # qkv
            + 2 * 2 * N * N * D  # q k^T and weights @ v
            + 2 * N * D * D  # output projection
            + 2 * 2 * N * D * hidden_mlp  # MLP fc1 + fc2
            + 2 * D * 6 * D
        )  # adaLN modulation (once per image)
        embed = 2 * N * p2c_in * D + 2 * (self.t_embedder.frequency_size * D + D * D)
        final = 2 * D * 2 * D + 2 * N * D * p2c_out
        return int(embed + L * per_block + final)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        return_hidden: int | None = None,
    ):
        if return_hidden is not None and not 1 <= return_hidden <= self.depth:
            raise ValueError(f"return_hidden must be a block index in 1..{self.depth}, got {return_hidden}")
        h = self.x_embedder(x)
        # fp32 residual stream by default (bf16 patch embedding + fp32 pos_embed promotes); with
        # lowp_residual it stays in the patch embedding's dtype (bf16 under bf16 autocast)
        h = h + (self.pos_embed.to(h.dtype) if self.lowp_residual else self.pos_embed)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        if _sharded(self.blocks[0]):
            return self._forward_per_block(h, c, return_hidden, use_ckpt)
        impl = resolve_impl(self.norm_kernels, h)
        # every block's (shift1, scale1, gate1, shift2, scale2, gate2) up front (they depend on c
        # only), so that each layer norm can be fused with the residual update that precedes it
        mods = [block.adaLN_modulation(c).chunk(6, dim=1) for block in self.blocks]
        final_shift, final_scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        a = norm_modulate(h, mods[0][0], mods[0][1], self.blocks[0].norm1.eps, impl)
        hidden = None
        for i, block in enumerate(self.blocks):
            if i + 1 < self.depth:
                nxt = (mods[i + 1][0], mods[i + 1][1], self.blocks[i + 1].norm1.eps)
            else:
                nxt = (final_shift, final_scale, self.final_layer.norm_final.eps)
            args = (h, a, mods[i][2], mods[i][3], mods[i][4], mods[i][5], *nxt, impl)
            if use_ckpt:
                # recompute the block in backward instead of storing its activations (~ +33% compute)
                h, a = torch.utils.checkpoint.checkpoint(block.forward_chained, *args, use_reentrant=False)
            else:
                h, a = block.forward_chained(*args)
            if i + 1 == return_hidden:
                hidden = h
        return self._output(self.final_layer.linear(a), hidden, return_hidden)

    def _forward_per_block(self, h: torch.Tensor, c: torch.Tensor, return_hidden: int | None,
                           use_ckpt: bool):
        """Each block computes its own modulation inside its own forward (:meth:`DiTBlock.forward`).

        For FSDP2 with one unit per block: a unit's parameters are gathered only in that block's
        forward, so the chained path, which reads every block's adaLN weights up front, cannot run on
        them. Same function as the chained path (the layer norms are not fused with the residual
        updates here)."""
        hidden = None
        for i, block in enumerate(self.blocks):
            if use_ckpt:
                h = torch.utils.checkpoint.checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
            if i + 1 == return_hidden:
                hidden = h
        return self._output(self.final_layer(h, c), hidden, return_hidden)

    def _output(self, tokens: torch.Tensor, hidden: torch.Tensor | None, return_hidden: int | None):
        out = self.unpatchify(tokens)
        if self.returned_channels != self.out_channels:
            out = out[:, : self.returned_channels]
        return out if return_hidden is None else (out, hidden)


def _sharded(block: DiTBlock) -> bool:
    """Whether the block's parameters are FSDP2 shards (DTensors) at this point of the forward
    (by type name: ``torch.distributed`` is not built into every torch)."""
    return any(type(p).__name__ == "DTensor" for p in block.adaLN_modulation.parameters())


def parse_preset(name: str) -> tuple[int, int, int, int]:
    """'DiT-S/2' -> (hidden_size, depth, num_heads, patch_size)."""
    arch, _, patch = name.partition("/")
    if arch not in PRESETS or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        names = ", ".join(f"{a}/{p}" for a in PRESETS for p in PATCH_SIZES)
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {names}")
    return (*PRESETS[arch], int(patch))


def dit_from_preset(
    name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 10, **kw
) -> DiT:
    """Build a DiT from a preset name such as ``"DiT-S/2"`` (sizes: DiT paper Table 1, plus DiT-T)."""
    hidden_size, depth, num_heads, patch_size = parse_preset(name)
    return DiT(
        input_size=input_size,
        in_channels=in_channels,
        patch_size=patch_size,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        num_classes=num_classes,
        **kw,
    )
