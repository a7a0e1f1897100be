"""Character-level Tiny Shakespeare (karpathy/char-rnn ``input.txt``, 1,115,394 characters, 65 symbols).

The vocabulary is the sorted set of characters of the whole file (so train and val share ids); the
split is contiguous: the first ``1 - val_fraction`` of the characters are ``train``, the rest ``val``
(contiguous rather than shuffled so that no val window overlaps a train window). Items are
non-overlapping windows of ``seq_len`` ids; :meth:`CharText.random_batch` draws random crops for
training. The file is looked up as ``<root>/text/tinyshakespeare.txt`` (root: the argument, else
$DIFFTOOLS_DATA; docs/data.md); a missing file raises FileNotFoundError naming the paths tried.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftools.data.base import data_roots, missing

FILE = Path("text") / "tinyshakespeare.txt"


def find_text(root=None) -> Path:
    """Path of the Tiny Shakespeare file, or a FileNotFoundError listing every path tried."""
    tried = [r / FILE for r in data_roots(root)]
    for path in tried:
        if path.is_file():
            return path
    raise missing("tinyshakespeare", tried, "text file (text/tinyshakespeare.txt)", "text/", root)


class CharText(torch.utils.data.Dataset):
    """Char-level text windows ``LongTensor [seq_len]``; ``.chars`` maps ids back to characters."""

    def __init__(self, root=None, split: str = "train", seq_len: int = 64, val_fraction: float = 0.1):
        if split not in ("train", "val", "all"):
            raise ValueError(f"CharText: unknown split {split!r}; choose train, val or all")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"CharText: val_fraction must be in (0, 1), got {val_fraction}")
        self.path = find_text(root)
        text = self.path.read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * (1.0 - val_fraction))
        self.ids = {"train": ids[:cut], "val": ids[cut:], "all": ids}[split]
        if len(self.ids) < seq_len + 1:
            raise ValueError(f"CharText: split {split!r} has {len(self.ids)} characters < seq_len {seq_len}")
        self.seq_len = seq_len
        self.split = split

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.ids) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"CharText index {i} out of range [0, {len(self)})")
        return self.ids[i * self.seq_len : (i + 1) * self.seq_len]

    def random_batch(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``batch_size`` random crops [B, seq_len] (start positions uniform over the split)."""
        starts = torch.randint(0, len(self.ids) - self.seq_len, (batch_size,), generator=generator)
        return self.ids[starts[:, None] + torch.arange(self.seq_len)]

    def encode(self, text: str) -> torch.Tensor:
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"CharText.encode: characters not in the vocabulary: {unknown!r}")
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        """Characters of ``ids``; ids >= vocab_size (e.g. [MASK]) are shown as '_'."""
        return "".join(
            self.chars[i] if 0 <= i < len(self.chars) else "_" for i in torch.as_tensor(ids).tolist()
        )
