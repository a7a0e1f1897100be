"""A small transformer over token ids 0..V returning logits over the V real tokens.

Bidirectional (``causal=False``, the masked-diffusion network): id V is [MASK]. No time input: for
absorbing diffusion the number of masks already tells the network the noise level (MDLM,
arXiv 2406.07524, drops time conditioning for the same reason).

Causal (``causal=True``, the autoregressive judge of :mod:`difftools.discrete.judge`): id V is a
beginning-of-sequence token and position l only attends to positions <= l.
"""

from __future__ import annotations

import torch
from torch import nn

from difftools.models.registry import register_rebuildable


@register_rebuildable
class TokenTransformer(nn.Module):
    """``model(z [B, L] long in [0, V]) -> logits [B, L, V]`` (pre-LN nn.TransformerEncoder).

    Args:
        vocab_size: V, the number of real tokens; id V is [MASK] (or BOS when ``causal``).
        seq_len: the longest sequence (learned positional embeddings).
        dim, depth, heads: width, number of blocks, attention heads (dim % heads == 0).
        causal: attend only to earlier positions (an autoregressive model).
        dropout: dropout in the blocks (0 for the small CPU runs; ~0.1 at the GPU scale, where
            Tiny Shakespeare's 1M characters are seen many times).
    """

    def __init__(self, vocab_size: int, seq_len: int, dim: int = 128, depth: int = 3, heads: int = 4,
                 causal: bool = False, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TokenTransformer: dim {dim} is not divisible by heads {heads}")
        self._config = dict(vocab_size=vocab_size, seq_len=seq_len, dim=dim, depth=depth, heads=heads,
                            causal=causal, dropout=dropout)
        self.vocab_size, self.seq_len, self.mask_id, self.causal = vocab_size, seq_len, vocab_size, causal
        self.embed = nn.Embedding(vocab_size + 1, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        # same scale as the token embedding: a much smaller positional signal left the model on a long
        # unigram plateau (it could not tell neighbours apart), measured on Tiny Shakespeare and the toy chain
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def config(self) -> dict:
        """Constructor arguments (what a checkpoint rebuilds the model from)."""
        return dict(self._config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] > self.seq_len:
            raise ValueError(f"TokenTransformer expects [B, L<={self.seq_len}] ids, got {tuple(z.shape)}")
        if z.dtype != torch.long or z.min() < 0 or z.max() > self.mask_id:
            raise ValueError(
                f"TokenTransformer expects long ids in [0, {self.mask_id}] ([MASK] = {self.mask_id})"
            )
        h = self.embed(z) + self.pos[:, : z.shape[1]]
        mask = None
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(z.shape[1], device=z.device, dtype=h.dtype)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=self.causal)))

    def flops_per_image(self) -> float:
        """Forward FLOPs of one sequence (2 x multiply-adds of the matmuls, attention included), for
        the engine's throughput log."""
        d, n, depth = self._config["dim"], self._config["seq_len"], self._config["depth"]
        per_block = 2 * n * (4 * d * d + 8 * d * d) + 2 * 2 * n * n * d
        return float(depth * per_block + 2 * n * d * self.vocab_size)
