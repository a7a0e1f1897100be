"""Deterministic, resumable pieces of the training state: data order and random generators.

Data order: epoch e visits the dataset in the order ``randperm(n)`` drawn from a generator seeded
with ``seed + e`` (independent of the global RNG), split into global batches (the last partial
batch dropped); rank r of w reads items ``[r * B/w, (r+1) * B/w)`` of each global batch. So the
batch read at step k is a pure function of (seed, k, rank, world size) and resuming at step k
means starting the sampler at k -- no skipping through the loader, no hidden iterator state.
With ``flip=True`` the same generator draws one horizontal-flip bit per item and the sampler yields
``(index, flip)`` keys (difftools datasets accept them), so augmentation is resumable too.
"""

from __future__ import annotations

import random

import numpy as np
import torch


class BatchPlan:
    """Which dataset indices each rank reads for the k-th global batch (k counted from 0)."""

    def __init__(self, num_items: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 flip: bool = False):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if num_items < global_batch:
            raise ValueError(f"the dataset has {num_items} items, fewer than one global batch of "
                             f"{global_batch}")
        self.num_items, self.global_batch = num_items, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_device = global_batch // world_size
        self.batches_per_epoch = num_items // global_batch
        self.flip = bool(flip)
        self._perm_epoch, self._perm, self._flips = -1, None, None

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of global batch k."""
        return divmod(k, self.batches_per_epoch)

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(permutation [n] of the dataset, flip bit [n] per item or None) of ``epoch`` (CPU tensors)."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_items, generator=g), epoch
            self._flips = torch.randint(0, 2, (self.num_items,), generator=g) if self.flip else None
        return self._perm, self._flips

    def start(self, k: int) -> int:
        """Where this rank's share of global batch k starts in its epoch's permutation."""
        return self.position(k)[1] * self.global_batch + self.rank * self.per_device

    def indices(self, k: int) -> list:
        """Dataset keys of this rank's share of global batch k: ints, or (index, flip) pairs."""
        self.epoch_order(self.position(k)[0])
        start = self.start(k)
        idx = self._perm[start:start + self.per_device].tolist()
        if self._flips is None:
            return idx
        return [(i, int(self._flips[i])) for i in idx]


class ResumableBatchSampler:
    """Infinite ``batch_sampler`` for a DataLoader, starting at global batch ``start``."""

    def __init__(self, plan: BatchPlan, start: int = 0):
        self.plan, self.start = plan, int(start)

    def __iter__(self):
        k = self.start
        while True:
            yield self.plan.indices(k)
            k += 1


def capture_rng(noise_generator: torch.Generator | None = None) -> dict:
    """All random states a training step can touch, as tensors / plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if noise_generator is not None:
        state["noise"] = noise_generator.get_state()
    return state


def restore_rng(state: dict, noise_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if noise_generator is not None:
        noise_generator.set_state(state["noise"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
