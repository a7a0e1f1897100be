"""Image editing with frozen diffusion models: CASO embeddings (arXiv 2505.14254) and ODE inversion.

* :mod:`difftools.editing.caso`: conditioning wrapper of a DiT, the one-step CFG estimate, the CASO
  loss, the released trainer's fixed training time.
* :mod:`difftools.editing.embeddings`: the learned embeddings in their two slots (a free vector, a
  new label-table row in the span of the trained rows) and their safetensors file.
* :mod:`difftools.editing.optimize`: the training objective on the engine (only the embeddings learn).
* :mod:`difftools.editing.inversion`: probability-flow ODE inversion (DDIM inversion and the other
  multistep solvers on the reversed grid), regeneration, and ``edit``.
* :mod:`difftools.editing.baselines`: what CASO is measured against (a mean-difference embedding
  direction, classifier guidance along the inverted trajectory).
* :mod:`difftools.editing.sweep`: a sweep of editing methods over shared inversions, the
  success / preservation frontier and the selection rule; :mod:`difftools.editing.measures`: SSIM.
* :mod:`difftools.editing.attributes`: derived binary attributes (stroke thickness; slant, whose
  moment measure is also the judge of slant edits).
"""

from difftools.editing.caso import (
    EmbeddingDiT,
    caso_loss,
    guided_model_fn,
    one_step_x0,
    released_train_time,
)
from difftools.editing.embeddings import (
    LabelRowEmbeddings,
    SemanticEmbeddings,
    load_embeddings,
    make_embeddings,
    save_embeddings,
)
from difftools.editing.inversion import edit, invert, regenerate
from difftools.editing.optimize import CasoConfig, CasoObjective, CasoResult, train_embeddings

__all__ = [
    "CasoConfig",
    "CasoObjective",
    "CasoResult",
    "EmbeddingDiT",
    "LabelRowEmbeddings",
    "SemanticEmbeddings",
    "caso_loss",
    "edit",
    "guided_model_fn",
    "invert",
    "load_embeddings",
    "make_embeddings",
    "one_step_x0",
    "regenerate",
    "released_train_time",
    "save_embeddings",
    "train_embeddings",
]
