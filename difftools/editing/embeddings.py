"""The learned CASO embeddings (the only trained parameters) in two slots, and their file format.

CASO (arXiv 2505.14254) learns, in Stable Diffusion, the input vector of token slot 1 of the empty
prompt; the vector then passes through the frozen CLIP text encoder before it conditions the UNet.
A class-conditional DiT has no encoder between its label table and the blocks: the conditioning is
c = t_emb(t) + table[y] (:mod:`difftools.models.dit`), and every block reads c through its frozen
adaLN modulation, Linear(SiLU(c)). Two slots are offered:

* ``vector`` (:class:`SemanticEmbeddings`): e_a is a free vector in R^D used in place of table[y].
  A new row appended to the label table and looked up by the DiT's own forward is exactly this
  (the lookup is the identity map onto R^D; tested bit for bit), so "a new class row" alone adds
  no constraint in this architecture.
* ``label_row`` (:class:`LabelRowEmbeddings`): e_a = sum_r c_{a,r} table[r], a new row that lies in
  the span of the frozen table's R = num_classes + 1 trained rows (the class rows and the null row);
  only the coefficients c_a in R^R learn. This is the constraint the token slot gets from the
  frozen text encoder: the learned conditioning can only be made of what the frozen conditioning
  path was trained to read. Initialised at the null row (c_a = one-hot(null)), as ``vector``.

Both start at the null ("empty prompt") row, expose ``vectors()`` [K, D] (what the DiT sees) and
``forward(index)`` (rows of it), and register for checkpoint rebuilding
(:func:`difftools.models.registry.register_rebuildable`; ``config()`` gives their arguments).
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from difftools.checkpoint import atomic_file
from difftools.models.registry import register_rebuildable

__all__ = ["SLOTS", "LabelRowEmbeddings", "SemanticEmbeddings", "load_embeddings", "make_embeddings",
           "save_embeddings"]

SLOTS = ("vector", "label_row")
EMBEDDINGS_FORMAT = "difftools.caso.v1"


def _names_targets(names, targets) -> tuple[list[str], list[int]]:
    if not names:
        raise ValueError("CASO embeddings need at least one attribute value name")
    names = [str(n) for n in names]
    targets = list(range(len(names))) if targets is None else [int(a) for a in targets]
    if len(targets) != len(names):
        raise ValueError(f"{len(names)} names but {len(targets)} targets")
    return names, targets


class _Rows(nn.Module, abc.ABC):
    """What both slots share: one row per attribute value, its name and its classifier class."""

    slot = ""

    def __init__(self, names, targets):
        super().__init__()
        self.names, self.targets = _names_targets(names, targets)

    @abc.abstractmethod
    def vectors(self) -> torch.Tensor:
        """The K conditioning vectors [K, D] (differentiable in the trained parameters)."""

    @property
    def dim(self) -> int:
        return int(self.vectors().shape[1])

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"no learned embedding named {name!r}; have {self.names}")
        return self.names.index(name)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.vectors()[index]

    def target_tensor(self, index: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.targets, device=index.device)[index]


@register_rebuildable
class SemanticEmbeddings(_Rows):
    """``vector`` slot: K free conditioning vectors e_1..e_K [K, D], one per attribute value.

    Args:
        names: one name per row, e.g. ``["upright", "slanted"]`` or ``["3"]``.
        targets: the classifier class each row steers toward (default 0..K-1).
        dim: D, the DiT's hidden size.
        init: [D] starting point of every row (the null-class row: CASO's empty prompt); zeros if None.
    """

    slot = "vector"

    def __init__(self, names, targets=None, dim: int | None = None, init: torch.Tensor | None = None):
        super().__init__(names, targets)
        if init is not None and init.ndim != 1:
            raise ValueError(f"init must be one embedding [D], got shape {tuple(init.shape)}")
        if dim is None:
            if init is None:
                raise ValueError("SemanticEmbeddings needs dim or init")
            dim = init.shape[0]
        if init is not None and init.shape[0] != dim:
            raise ValueError(f"init has {init.shape[0]} entries, dim is {dim}")
        start = torch.zeros(int(dim)) if init is None else init.detach().float()
        self.weight = nn.Parameter(start.expand(len(self.names), -1).clone())

    def vectors(self) -> torch.Tensor:
        return self.weight

    def config(self) -> dict:
        return {"names": list(self.names), "targets": list(self.targets), "dim": int(self.weight.shape[1])}


@register_rebuildable
class LabelRowEmbeddings(_Rows):
    """``label_row`` slot: e_a = c_a^T T, a new label-table row in the span of the frozen table T.

    Args:
        names, targets: as :class:`SemanticEmbeddings`.
        num_rows, dim: the shape [R, D] of the DiT's label table (R = num_classes + 1, null last).
        table: the table's weights (copied into the non-trained buffer ``table``, saved with the
            coefficients so that a checkpoint rebuilds the vectors without the DiT).
        init_row: the row every c_a starts at (one-hot); default the last one, the null row.
    """

    slot = "label_row"

    def __init__(self, names, targets=None, num_rows: int | None = None, dim: int | None = None,
                 table: torch.Tensor | None = None, init_row: int | None = None):
        super().__init__(names, targets)
        if table is not None:
            if table.ndim != 2:
                raise ValueError(f"table must be the [R, D] label table, got shape {tuple(table.shape)}")
            num_rows, dim = table.shape if num_rows is None else (num_rows, dim)
            if tuple(table.shape) != (num_rows, dim):
                raise ValueError(f"table has shape {tuple(table.shape)}, expected ({num_rows}, {dim})")
        if num_rows is None or dim is None:
            raise ValueError("LabelRowEmbeddings needs the table or its shape (num_rows, dim)")
        init_row = num_rows - 1 if init_row is None else int(init_row)
        if not 0 <= init_row < num_rows:
            raise ValueError(f"init_row {init_row} is not a row of a {num_rows}-row table")
        self.register_buffer("table", torch.zeros(num_rows, dim) if table is None
                             else table.detach().float().clone())
        coef = torch.zeros(len(self.names), num_rows)
        coef[:, init_row] = 1.0
        self.coef = nn.Parameter(coef)

    def vectors(self) -> torch.Tensor:
        return self.coef @ self.table

    def config(self) -> dict:
        return {"names": list(self.names), "targets": list(self.targets),
                "num_rows": int(self.table.shape[0]), "dim": int(self.table.shape[1])}


def make_embeddings(slot: str, table: torch.Tensor, null_row: int, names, targets=None) -> _Rows:
    """The embeddings of ``slot`` for a DiT whose label table is ``table`` [R, D], started at row
    ``null_row`` (the null class)."""
    if slot == "vector":
        return SemanticEmbeddings(names, targets, dim=table.shape[1], init=table[null_row])
    if slot == "label_row":
        return LabelRowEmbeddings(names, targets, table=table, init_row=null_row)
    raise ValueError(f"unknown CASO slot {slot!r}; choose one of {SLOTS}")


# ------------------------------------------------------------------ file format
def save_embeddings(path: str | os.PathLike, embeddings: _Rows, meta: dict | None = None) -> Path:
    """Write the K vectors (tensor ``embeddings`` [K, D]; for ``label_row`` also ``coefficients``)
    as safetensors with JSON metadata, atomically (:func:`difftools.checkpoint.atomic_file`)."""
    from safetensors.torch import save_file

    path = Path(path)
    info = {"format": EMBEDDINGS_FORMAT, "names": embeddings.names, "targets": embeddings.targets,
            "dim": embeddings.dim, "slot": embeddings.slot, **(meta or {})}
    tensors = {"embeddings": embeddings.vectors().detach().cpu().contiguous().clone()}
    if isinstance(embeddings, LabelRowEmbeddings):
        tensors["coefficients"] = embeddings.coef.detach().cpu().contiguous().clone()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"caso": json.dumps(info, default=str)})
    return path


def load_embeddings(path: str | os.PathLike,
                    hidden_size: int | None = None) -> tuple[SemanticEmbeddings, dict]:
    """Read a file of :func:`save_embeddings` as :class:`SemanticEmbeddings` (the vectors the DiT
    sees, whatever slot learned them; ``meta["slot"]`` says which); checks the dimension against
    ``hidden_size`` (the DiT's)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CASO embeddings not found: {path} (train them with `python train/edit.py "
                                "base=<dit run> ...`; the file is <run>/embeddings.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("caso")
            weight = f.get_tensor("embeddings")
    except Exception as err:
        raise ValueError(f"{path} is not a CASO embeddings file: {err}") from err
    if raw is None:
        raise ValueError(f"{path} has no CASO metadata: not written by difftools.editing.save_embeddings")
    meta = json.loads(raw)
    if weight.ndim != 2 or len(meta["names"]) != weight.shape[0]:
        raise ValueError(f"{path}: embeddings of shape {tuple(weight.shape)} do not match names "
                         f"{meta['names']}")
    if hidden_size is not None and weight.shape[1] != int(hidden_size):
        raise ValueError(f"{path} holds {weight.shape[1]}-dimensional embeddings but the DiT's conditioning "
                         f"space has {hidden_size} dimensions: they were learned for another model")
    emb = SemanticEmbeddings(meta["names"], meta["targets"], init=weight[0])
    with torch.no_grad():
        emb.weight.copy_(weight)
    return emb, meta
