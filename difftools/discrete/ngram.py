"""Interpolated character n-gram model used as a weak proxy for generative perplexity.

p(c | h) = sum_k lambda_k p_ML,k(c | last k-1 chars of h), k = 1..n, plus lambda_0 / V (uniform), with
fixed interpolation weights (Jelinek-Mercer; lambdas default to favouring longer contexts); an
unseen context order contributes its weight to the uniform term so p > 0 everywhere.
``nll(ids)`` = mean -log p per character (nats) over positions >= n-1 of each sequence.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch


class CharNGram:
    def __init__(self, ids: torch.Tensor, vocab_size: int, order: int = 4, lambdas=None):
        self.order, self.vocab_size = order, vocab_size
        self.lambdas = (
            list(lambdas)
            if lambdas is not None
            else [0.01] + [0.99 * 2**k / (2**order - 1) for k in range(order)]
        )
        if len(self.lambdas) != order + 1 or abs(sum(self.lambdas) - 1.0) > 1e-6:
            raise ValueError(f"CharNGram: need {order + 1} lambdas summing to 1, got {self.lambdas}")
        seq = ids.tolist()
        self.counts = [defaultdict(Counter) for _ in range(order)]
        for k in range(order):  # k = context length
            table = self.counts[k]
            for i in range(k, len(seq)):
                table[tuple(seq[i - k : i])][seq[i]] += 1
        self.totals = [{h: sum(c.values()) for h, c in table.items()} for table in self.counts]

    def logprob(self, context: tuple, c: int) -> float:
        p = self.lambdas[0] / self.vocab_size
        for k in range(self.order):
            h = context[len(context) - k :] if k else ()
            total = self.totals[k].get(h)
            if total:
                p += self.lambdas[k + 1] * self.counts[k][h][c] / total
            else:
                p += self.lambdas[k + 1] / self.vocab_size
        return math.log(p)

    def nll_per_sequence(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean NLL (nats/char) of ``ids`` [B, L] over positions >= order - 1."""
        ids = torch.as_tensor(ids)
        if ids.shape[-1] < self.order:
            raise ValueError(f"CharNGram: sequences of length {ids.shape[-1]} < order {self.order}")
        out = []
        for row in ids.reshape(-1, ids.shape[-1]).tolist():
            terms = [
                -self.logprob(tuple(row[i - self.order + 1 : i]), row[i])
                for i in range(self.order - 1, len(row))
            ]
            out.append(sum(terms) / len(terms))
        return torch.tensor(out, dtype=torch.float64)

    def nll(self, ids: torch.Tensor) -> float:
        """Mean per-character NLL (nats) of ``ids`` [B, L] (or [L]); equal-length rows, so this is the
        mean of :meth:`nll_per_sequence`."""
        return self.nll_per_sequence(ids).mean().item()


def unigram_entropy(ids: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the pooled character histogram of ``ids``: low values flag collapse."""
    counts = torch.bincount(torch.as_tensor(ids).reshape(-1), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
