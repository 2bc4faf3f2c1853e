"""The training sampler: micro-batches dealt from global optimizer steps, the same whatever the world size.

Each epoch a permutation of all items (seeded by ``(seed, epoch)``) is cut into optimizer steps of
``global_batch = micro_batch_size x accumulation x world_size`` items; a step is cut into
``accumulation x world_size`` micro-batches, and rank ``r`` takes micro-batches
``r * accumulation ... r * accumulation + accumulation - 1`` of every step, in order. So:

* the micro-batches of a step, and what is averaged into its gradient, depend on the global batch
  and the micro-batch size only, not on how many processes share them: 2 processes of 1
  micro-batch and 1 process accumulating 2 compute the same step;
* each micro-batch has a seed of its own, ``seed_of(epoch, step, micro)``, the same for whichever
  rank computes it: the dataset's negatives and answers, the masking and dropout derive from it, so
  a run continued on another number of processes draws the same random numbers;
* the position of an epoch is a global sample count (``step x global_batch``): a checkpoint taken
  at a step boundary resumes on another world size with no item repeated or skipped. The items
  past the last whole step of an epoch (fewer than one global batch) are not used in that epoch.
"""

from __future__ import annotations

import numpy as np

from .sampler import BatchRequest


class StepSampler:
    """Batch sampler of one rank's micro-batches, world-size invariant (see the module docstring)."""

    def __init__(self, num_items: int, micro_batch_size: int, accumulation: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if num_items <= 0 or micro_batch_size <= 0 or accumulation <= 0:
            raise ValueError("num_items, micro_batch_size and accumulation must be positive")
        self.num_items, self.micro_batch_size, self.accumulation = num_items, micro_batch_size, accumulation
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.global_batch = micro_batch_size * accumulation * world_size
        self.epoch = 0
        self.position = 0    # micro-batches of this rank yielded so far in this epoch
        self._start = 0      # where the next iteration starts

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def __len__(self) -> int:
        """Micro-batches of this rank per epoch."""
        return self.steps_per_epoch * self.accumulation

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op for the epoch being resumed)."""
        if epoch != self.epoch:
            self.epoch, self._start, self.position = epoch, 0, 0

    def order(self, epoch: int) -> np.ndarray:
        return (np.random.default_rng([self.seed, epoch]).permutation(self.num_items) if self.shuffle
                else np.arange(self.num_items))

    def seed_of(self, epoch: int, step: int, micro: int) -> int:
        """The seed of micro-batch ``micro`` (0 .. accumulation x world_size - 1) of ``step`` of ``epoch``."""
        ss = np.random.SeedSequence([self.seed, epoch, step, micro, 0x57E9])
        return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))

    def locate(self, position: int) -> tuple[int, int]:
        """(step, global micro index) of this rank's micro-batch number ``position`` in the epoch."""
        step, a = divmod(position, self.accumulation)
        return step, self.rank * self.accumulation + a

    def micro_seed(self, position: int) -> int:
        """The seed of this rank's micro-batch number ``position`` of the current epoch."""
        return self.seed_of(self.epoch, *self.locate(position))

    def __iter__(self):
        order, epoch, m = self.order(self.epoch), self.epoch, self.micro_batch_size
        self.position = self._start
        for pos in range(self._start, len(self)):
            step, micro = self.locate(pos)
            first = step * self.global_batch + micro * m
            self.position = pos + 1
            yield BatchRequest(order[first:first + m].astype(np.int64), self.seed_of(epoch, step, micro), epoch, pos)
        self._start = 0  # a completed pass: iterating again restarts the epoch

    def state_dict(self, position: int | None = None) -> dict:
        position = self.position if position is None else position
        return {"kind": "step", "epoch": self.epoch, "position": position,
                "sample": (position // self.accumulation) * self.global_batch, "seed": self.seed,
                "num_items": self.num_items, "global_batch": self.global_batch,
                "micro_batch_size": self.micro_batch_size, "world_size": self.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off, on this sampler's world size and micro-batch size: the global
        batch, the items and the seed must be the same; a change of world size or micro-batch size continues
        from a step boundary (checkpoints are at one). With another micro-batch size each step keeps its
        items, cut into other micro-batches (with other seeds)."""
        if state.get("kind") != "step":
            raise ValueError("sampler state of another kind (written before world-size-invariant sampling): "
                             "cannot resume with it")
        for k in ("seed", "num_items", "global_batch", "shuffle"):
            if state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]!r}, this run {getattr(self, k)!r}: cannot resume")
        if state["world_size"] == self.world_size and state["micro_batch_size"] == self.micro_batch_size:
            position = int(state["position"])
        else:
            step, rest = divmod(int(state["sample"]), self.global_batch)
            if rest or int(state["position"]) % (state["global_batch"] // (state["micro_batch_size"]
                                                                          * state["world_size"])):
                raise ValueError(f"sampler state at sample {state['sample']} is inside an optimizer step: a change of "
                                 f"world size or micro-batch size can only continue from a step boundary")
            position = step * self.accumulation
        self.epoch = int(state["epoch"])
        self._start = self.position = position
