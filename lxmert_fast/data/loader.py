"""The resumable loader pre-training and the fine-tuning tasks share: a DataLoader over a resumable batch
sampler (:func:`make_batch_sampler`) whose state counts the batches the caller has received."""

from __future__ import annotations

import torch

from .sampler import ShardedResumableSampler
from .step_sampler import StepSampler


def collate_identity(batch):
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a collated batch."""
    return batch


class ResumableLoader:
    """DataLoader + a resumable batch sampler (:class:`ShardedResumableSampler`, or for training
    :class:`~lxmert_fast.data.step_sampler.StepSampler`) whose state counts *consumed* batches
    (pre-training and the fine-tuning tasks).

    (The sampler itself runs ahead of the training loop by the prefetch depth; this wrapper
    records how many batches the caller actually received, so ``state_dict()`` resumes at the
    first batch the caller has not seen.)
    """

    def __init__(self, dataset, sampler, loader: torch.utils.data.DataLoader):
        self.dataset, self.sampler, self.loader = dataset, sampler, loader
        self._consumed = sampler.position

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def consumed(self) -> int:
        """Batches of the current epoch the caller has received (where a resume continues)."""
        return self._consumed

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._consumed = self.sampler._start

    def __iter__(self):
        self._consumed = self.sampler._start
        for batch in self.loader:
            self._consumed += 1
            yield batch

    def micro_seed(self) -> int:
        """The seed of the batch last received: the same whichever rank computes it (a StepSampler)."""
        return self.sampler.micro_seed(self._consumed - 1)

    def state_dict(self) -> dict:
        return self.sampler.state_dict(position=self._consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._consumed = self.sampler._start


def make_batch_sampler(num_items: int, batch_size: int, *, rank: int, world_size: int, seed: int, shuffle: bool,
                       drop_last: bool, accumulation: int | None):
    """A :class:`StepSampler` for training (``accumulation`` given), else a :class:`ShardedResumableSampler`."""
    if accumulation is None:
        return ShardedResumableSampler(num_items, batch_size, rank=rank, world_size=world_size, seed=seed,
                                       shuffle=shuffle, drop_last=drop_last)
    if not drop_last:
        raise ValueError("a training sampler (accumulation given) uses whole optimizer steps only: drop_last=True")
    return StepSampler(num_items, batch_size, accumulation, rank=rank, world_size=world_size, seed=seed,
                       shuffle=shuffle)
