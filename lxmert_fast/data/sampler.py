"""The sharded, resumable batch sampler (evaluation; training uses :mod:`~lxmert_fast.data.step_sampler`)
and the :class:`BatchRequest` every sampler hands to a dataset."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class BatchRequest(NamedTuple):
    """What the sampler hands to the dataset: item indices and the batch's random seed."""

    indices: np.ndarray   # (B,) int64
    seed: int
    epoch: int
    position: int         # batch number within this rank's epoch


class ShardedResumableSampler:
    """Batch sampler: shards items across ranks, deterministic per seed, resumable mid-epoch.

    Each epoch a permutation of all items (same on every rank) is padded by wrapping around to a
    multiple of ``world_size`` and dealt round-robin: rank r gets positions r, r + W, ... (so
    ranks are disjoint and together complete; with padding a few items appear twice). Batches
    of ``batch_size`` follow; ``drop_last`` drops a final short batch. ``state_dict()`` stores
    the epoch and the number of batches consumed; after ``load_state_dict()`` iteration yields
    exactly the remaining batches, with the same seeds.
    """

    def __init__(self, num_items: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if num_items <= 0 or batch_size <= 0:
            raise ValueError("num_items and batch_size must be positive")
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.position = 0       # batches yielded so far in this epoch
        self._start = 0         # where the next iteration starts

    @property
    def per_rank(self) -> int:
        return -(-self.num_items // self.world_size)

    def __len__(self) -> int:
        n = self.per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op for the epoch being resumed)."""
        if epoch != self.epoch:
            self.epoch, self._start, self.position = epoch, 0, 0

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's item order for an epoch (before batching)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        total = self.per_rank * self.world_size
        if total > self.num_items:
            order = np.concatenate([order, order[:total - self.num_items]])
        return order[self.rank::self.world_size]

    def batch_seed(self, epoch: int, position: int) -> int:
        ss = np.random.SeedSequence([self.seed, epoch, self.rank, position, 0x1A7E])
        return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))

    def __iter__(self):
        idx = self.rank_indices()
        n_batches, start, epoch = len(self), self._start, self.epoch
        self.position = start
        for pos in range(start, n_batches):
            chunk = idx[pos * self.batch_size:(pos + 1) * self.batch_size]
            self.position = pos + 1
            yield BatchRequest(chunk.astype(np.int64), self.batch_seed(epoch, pos), epoch, pos)
        self._start = 0  # a completed pass: iterating again restarts the epoch

    def state_dict(self, position: int | None = None) -> dict:
        return {"epoch": self.epoch, "position": self.position if position is None else position,
                "seed": self.seed, "num_items": self.num_items, "batch_size": self.batch_size,
                "world_size": self.world_size, "rank": self.rank, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "num_items", "batch_size", "world_size", "shuffle", "drop_last"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]!r}, this sampler "
                                 f"{getattr(self, k)!r}: cannot resume")
        self.epoch = int(state["epoch"])
        self._start = self.position = int(state["position"])
