"""Baselines CASO is measured against, both without any optimisation of an embedding.

* **Mean-difference direction** (the classic no-training concept direction): the mean label
  embedding of attribute-positive images minus that of attribute-negative ones,

      d = mean{ emb(x) : a(x) = 1 } - mean{ emb(x) : a(x) = 0 },

  where the label embedding of an image in a class-conditional DiT is its class row,
  emb(x) = table[y(x)] (:func:`label_embeddings`; in Stable Diffusion it would be its caption's
  text embedding). So d = sum_k (P(k | a = 1) - P(k | a = 0)) table[k]: it is exactly zero when the
  attribute is balanced inside every class, and otherwise points toward the classes where the
  attribute is common. The edit conditions on e_null +- s d / |d| (``+`` toward a = 1) through the
  same CFG as CASO, with the step length s fixed, not learned: the mean distance of the class rows
  from the null row, "one class step" (:func:`mean_difference_embeddings`).
* **Classifier guidance along the inverted trajectory** (:class:`ClassifierGuidedFn`): after the
  same null-class inversion, denoise with the unguided model and move every one-step estimate along
  the attribute classifier's gradient, on the estimate itself (the classifier is a clean-image
  classifier; MPGD, He et al. 2023, arXiv 2311.16424, guides x0_hat the same way, without
  backpropagating through the diffusion model):

      x0' = x0_hat + s grad_x0 log p_F(a | x0)|_{x0 = x0_hat},    eps' = (x_t - alpha_t x0') / sigma_t.

  The gradient of log p vanishes as the classifier becomes sure, so the push stops by itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from difftools.editing.caso import EmbeddingDiT
from difftools.editing.embeddings import SemanticEmbeddings
from samplers.model import ModelFn
from samplers.process import Denoised, broadcast_to, scalar_at

__all__ = ["ClassifierGuidedFn", "class_step", "label_embeddings", "mean_difference_direction",
           "mean_difference_embeddings"]


def label_embeddings(net: EmbeddingDiT, labels: torch.Tensor) -> torch.Tensor:
    """The label embedding of each image: its class row of the DiT's table, [N] -> [N, D] (detached)."""
    return net.label_embedding(labels.to(net.dit.y_embedder.embedding_table.weight.device)).detach()


def mean_difference_direction(embeddings: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """mean(embeddings[positive]) - mean(embeddings[~positive]) [D] (float64 sums, then float32)."""
    positive = positive.bool()
    if embeddings.ndim != 2 or len(embeddings) != len(positive):
        raise ValueError(f"need embeddings [N, D] and positive [N], got {tuple(embeddings.shape)} and "
                         f"{tuple(positive.shape)}")
    if positive.all() or not positive.any():
        raise ValueError("the mean difference needs both attribute-positive and -negative images")
    e = embeddings.double()
    return (e[positive].mean(0) - e[~positive].mean(0)).float()


def class_step(net: EmbeddingDiT) -> float:
    """Mean distance of the class rows from the null row of the label table."""
    table = net.label_table()
    return float((table[: net.null_class] - table[net.null_class]).norm(dim=1).mean())


def mean_difference_embeddings(net: EmbeddingDiT, labels: torch.Tensor, positive: torch.Tensor,
                               names=("negative", "positive"), targets=(0, 1),
                               step: float | None = None) -> tuple[SemanticEmbeddings, torch.Tensor]:
    """Rows e_null - s d/|d| (toward a = 0) and e_null + s d/|d| (toward a = 1) with d the mean
    difference of the images' label embeddings and s = ``step`` (default :func:`class_step`).
    Returns (the two rows as embeddings, the raw direction d)."""
    d = mean_difference_direction(label_embeddings(net, labels), positive)
    norm = float(d.norm())
    if norm == 0.0:
        raise ValueError("the mean difference of the label embeddings is exactly zero (the attribute is "
                         "balanced inside every class): there is no direction to follow")
    s = class_step(net) if step is None else float(step)
    null = net.null_embedding().float()
    rows = SemanticEmbeddings(list(names), list(targets), init=null)
    with torch.no_grad():
        rows.weight.copy_(torch.stack([null - s * d / norm, null + s * d / norm]))
    return rows, d


class ClassifierGuidedFn(ModelFn):
    """A ModelFn whose one-step estimates are moved along grad log p_F(target | x0) (module docstring).

    Args:
        model_fn: the unguided denoiser (``ModelFn`` of the DiT, null conditioning).
        classifier: logits = classifier(image in [-1, 1]) of a clean-image classifier.
        target: the class to steer toward, an int or a [B] tensor.
        scale: s.
    """

    def __init__(self, model_fn: ModelFn, classifier: nn.Module, target, scale: float):
        super().__init__(model_fn.net, model_fn.process, model_fn.prediction, model_fn.time_input)
        self.inner, self.classifier, self.target, self.scale = model_fn, classifier, target, float(scale)

    @property
    def nfe(self) -> int:
        return self.inner.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        if hasattr(self, "inner"):
            self.inner.nfe = value

    def log_prob_grad(self, x0: torch.Tensor) -> torch.Tensor:
        """grad_x0 of sum_i log p_F(target_i | x0_i)."""
        target = torch.as_tensor(self.target, device=x0.device).expand(x0.shape[0])
        with torch.enable_grad():
            x = x0.detach().float().requires_grad_(True)
            logp = F.log_softmax(self.classifier(x).float(), dim=-1)
            (grad,) = torch.autograd.grad(logp.gather(1, target[:, None]).sum(), x)
        return grad.to(x0.dtype)

    def predict(self, x: torch.Tensor, t, **cond) -> Denoised:
        d = self.inner.predict(x, t, **cond)
        if self.scale == 0.0:
            return d
        x0 = d.x0 + self.scale * self.log_prob_grad(d.x0)
        if isinstance(t, (float, int)):
            a, s = scalar_at(self.process.alpha, float(t)), scalar_at(self.process.sigma, float(t))
        else:
            tt = self.batch_times(x, t)
            a, s = broadcast_to(self.process.alpha(tt), x), broadcast_to(self.process.sigma(tt), x)
        return Denoised(x0, (x - a * x0) / s)
