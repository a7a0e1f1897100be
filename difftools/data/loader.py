"""Reproducible, resumable data order.

:class:`ResumableSampler` draws epoch ``e``'s permutation (and, with ``flip=True``, one horizontal-
flip bit per item) from a generator seeded by ``(seed, e)`` alone, so the order is a pure function
of (seed, epoch, position): a run resumed at (epoch, index) sees exactly the items the
uninterrupted run would have seen, independent of worker count and prefetching. With flips it
yields ``(index, flip)`` keys, which difftools datasets accept in place of an index.

:class:`ResumableLoader` (what :func:`build_loader` returns) is a DataLoader that counts the
samples handed to the consumer, so ``loader.state_dict()`` is exact even while workers prefetch
ahead; ``loader.load_state_dict(state)`` restarts the sampler at that position (O(1), no skipping).
The sampler's own ``state_dict()`` counts *yielded* indices: it equals the consumed position
only with ``num_workers=0`` (no prefetch) — use the loader's when workers are on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler):
    """Seeded per-epoch permutation (or identity order with ``shuffle=False``) with a saveable position."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, flip: bool = False):
        if num_samples <= 0:
            raise ValueError(f"ResumableSampler needs num_samples > 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.flip = flip
        self.epoch = 0
        self.index = 0  # position within the epoch of the next item to yield

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices of epoch ``epoch`` in order, and the flip bits (or None)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        order = (
            torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        )
        flips = torch.randint(0, 2, (self.num_samples,), generator=g) if self.flip else None
        return order, flips

    def __iter__(self) -> Iterator:
        order, flips = self.epoch_order(self.epoch)
        while self.index < self.num_samples:
            i = self.index
            self.index += 1
            yield (int(order[i]), int(flips[i])) if flips is not None else int(order[i])
        self.epoch += 1
        self.index = 0

    def __len__(self) -> int:
        return self.num_samples - self.index

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = int(epoch), 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}"
            )
        if not 0 <= int(state["index"]) <= self.num_samples:
            raise ValueError(f"sampler index {state['index']} outside 0..{self.num_samples}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def _batch_len(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


class ResumableLoader(DataLoader):
    """DataLoader over a :class:`ResumableSampler` whose ``state_dict()`` is the consumed position."""

    sampler: ResumableSampler

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kw):
        super().__init__(dataset, sampler=sampler, **kw)
        self._position = (sampler.epoch, sampler.index)

    def __iter__(self):
        epoch, index = self.sampler.epoch, self.sampler.index
        self._position = (epoch, index)
        for batch in super().__iter__():
            index += _batch_len(batch)
            self._position = (epoch, index)
            yield batch
        self._position = (epoch + 1, 0)
        # with drop_last the sampler may stop short of the end only in a broken iterator; keep both in step
        self.sampler.epoch, self.sampler.index = self._position

    def state_dict(self) -> dict:
        return {"seed": self.sampler.seed, "epoch": self._position[0], "index": self._position[1]}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._position = (self.sampler.epoch, self.sampler.index)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    pin_memory: bool | None = None,
) -> ResumableLoader:
    """A :class:`ResumableLoader` whose order (and flips, if ``dataset.random_flip``) depend only on ``seed``.

    ``pin_memory`` defaults to True when CUDA is available. Workers persist across epochs.
    """
    sampler = ResumableSampler(
        len(dataset), seed=seed, shuffle=shuffle, flip=bool(getattr(dataset, "random_flip", False))
    )
    return ResumableLoader(
        dataset,
        sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
