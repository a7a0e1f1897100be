"""Image editing with frozen diffusion models: CASO embeddings (arXiv 2505.14254) and ODE inversion.

* :mod:`difftools.editing.caso`: conditioning wrapper of a DiT, learned semantic embeddings, the
  one-step CFG estimate and the CASO loss, safetensors I/O.
* :mod:`difftools.editing.optimize`: the resumable training loop (only the embeddings learn).
* :mod:`difftools.editing.inversion`: probability-flow ODE inversion (DDIM inversion and the other
  multistep solvers on the reversed grid), regeneration, and ``edit``.
* :mod:`difftools.editing.attributes`: derived binary attributes (stroke thickness) for attribute
  classifiers.
"""

from difftools.editing.caso import (
    EmbeddingDiT,
    SemanticEmbeddings,
    caso_loss,
    guided_model_fn,
    load_embeddings,
    one_step_x0,
    save_embeddings,
)
from difftools.editing.inversion import edit, invert, regenerate
from difftools.editing.optimize import CasoConfig, CasoResult, train_embeddings

__all__ = [
    "CasoConfig",
    "CasoResult",
    "EmbeddingDiT",
    "SemanticEmbeddings",
    "caso_loss",
    "edit",
    "guided_model_fn",
    "invert",
    "load_embeddings",
    "one_step_x0",
    "regenerate",
    "save_embeddings",
    "train_embeddings",
]
