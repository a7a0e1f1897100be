"""The judge: a small autoregressive character model, and the two numbers it gives samples.

MDLM (arXiv 2406.07524) and Duo (arXiv 2506.10892) report a sampler's quality as the pair
  * generative perplexity: exp of the judge's mean negative log-likelihood per token of the samples,
    gen-PPL = exp( sum_{n,l} -log p_judge(x_l^n | x_<l^n) / (N L) ), lower is better;
  * entropy: per sample, the entropy of its own token histogram, H^n = -sum_c f_c^n log f_c^n
    (f_c^n = count of c in sample n / L), averaged over samples. It catches what gen-PPL rewards:
    collapse and repetition ("the the the" has a low perplexity and a low entropy).
Here the judge is a :class:`~difftools.models.token_transformer.TokenTransformer` with ``causal=True``
trained on the training split with :class:`CausalLMObjective` (id V is BOS: the judge reads
[BOS, x_0, ..., x_{L-2}] and scores x_0 .. x_{L-1}, so every character of a sample is scored).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from difftools.discrete.objectives import OwnBatches


def with_bos(x: torch.Tensor, bos: int) -> torch.Tensor:
    """[BOS, x_0, ..., x_{L-2}]: the judge's input for scoring x [B, L]."""
    return torch.cat([torch.full_like(x[:, :1], bos), x[:, :-1]], dim=1)


class CausalLMObjective(OwnBatches):
    """Next-character cross-entropy (nats/char) of the causal judge on random crops."""

    kind = "char_lm"

    def __init__(self, model, batch_fn, seed: int = 0, val_fn=None, val_batches: int = 8,
                 dataset_info: dict | None = None):
        if not getattr(model, "causal", False):
            raise ValueError("CausalLMObjective needs a TokenTransformer with causal=True (the judge)")
        super().__init__(model, batch_fn, seed, dataset_info)
        self.val_fn, self.val_batches = val_fn, val_batches

    def forward(self, k, generator):
        x, _ = self.draw(k)
        return sequence_nll(self.model, x).mean(), {}

    @torch.no_grad()
    def evaluate(self, ema_model, step: int) -> dict:
        """``val_nll``: nats/char on ``val_batches`` fixed held-out batches."""
        if self.val_fn is None:
            return {}
        device = next(ema_model.parameters()).device
        nll = [sequence_nll(ema_model, self.val_fn(torch.Generator().manual_seed(i)).to(device)).mean().item()
               for i in range(self.val_batches)]
        return {"val_nll": sum(nll) / len(nll)}


def sequence_nll(judge, x: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean -log p_judge(x_l | x_<l) (nats/char), [B] float32; x on the judge's device."""
    logits = judge(with_bos(x, judge.vocab_size)).float()
    return F.cross_entropy(logits.transpose(1, 2), x, reduction="none").mean(1)


def sample_entropy(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """H^n of each sample's own token histogram (nats), [B] float64."""
    ids = torch.as_tensor(ids)
    counts = F.one_hot(ids, vocab_size).sum(1).double()
    f = counts / ids.shape[1]
    return -(torch.special.xlogy(f, f)).sum(1)


@torch.no_grad()
def score(judge, ids: torch.Tensor, vocab_size: int, batch: int = 256) -> dict:
    """gen-PPL and mean per-sample entropy of samples ``ids`` [N, L] (module docstring), with
    the standard errors over samples of the mean NLL and the mean entropy."""
    device = next(judge.parameters()).device
    nll = torch.cat([sequence_nll(judge, ids[i:i + batch].to(device)).double().cpu()
                     for i in range(0, len(ids), batch)])
    ent = sample_entropy(ids, vocab_size)
    n = len(ids)
    se = (lambda v: (v.std() / math.sqrt(n)).item() if n > 1 else float("nan"))
    return {"gen_ppl": math.exp(nll.mean().item()), "nll": nll.mean().item(), "nll_se": se(nll),
            "entropy": ent.mean().item(), "entropy_se": se(ent), "n": n}
