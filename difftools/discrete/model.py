"""A tiny bidirectional transformer over token ids 0..V (id V = [MASK]) returning logits over the V
real tokens. No time input: for absorbing diffusion the number of masks already tells the network
the noise level (MDLM, arXiv 2406.07524, drops time conditioning for the same reason)."""

from __future__ import annotations

import torch
from torch import nn


class TokenTransformer(nn.Module):
    """``model(z [B, L] long in [0, V]) -> logits [B, L, V]`` (pre-LN nn.TransformerEncoder)."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int = 128, depth: int = 3, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TokenTransformer: dim {dim} is not divisible by heads {heads}")
        self.config = dict(vocab_size=vocab_size, seq_len=seq_len, dim=dim, depth=depth, heads=heads)
        self.vocab_size, self.seq_len, self.mask_id = vocab_size, seq_len, vocab_size
        self.embed = nn.Embedding(vocab_size + 1, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        # same scale as the token embedding: a much smaller positional signal left the model on a long
        # unigram plateau (it could not tell neighbours apart), measured on Tiny Shakespeare and the toy chain
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] > self.seq_len:
            raise ValueError(f"TokenTransformer expects [B, L<={self.seq_len}] ids, got {tuple(z.shape)}")
        if z.dtype != torch.long or z.min() < 0 or z.max() > self.mask_id:
            raise ValueError(
                f"TokenTransformer expects long ids in [0, {self.mask_id}] ([MASK] = {self.mask_id})"
            )
        h = self.embed(z) + self.pos[:, : z.shape[1]]
        return self.head(self.norm(self.blocks(h)))
