"""What a logging interval reports: the mean of each loss, samples/s, TFLOP/s, MFU and data wait.

The losses are summed on the device step by step (non-finite values left out) and read back once
per interval; the timer counts training time only: evaluation and checkpoint writing inside the
interval are excluded (`exclude`), so the samples/s after an evaluation is not inflated or deflated.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from lxmert_fast.flops import throughput
from lxmert_fast.train.process import all_reduce_sum


class IntervalMeter:
    def __init__(self, names: tuple[str, ...], device: torch.device, train_batch_size: int,
                 flops_per_sample: Optional[float], world: int, peak_tflops: Optional[float]):
        self.names, self.device, self.train_batch_size = names, device, train_batch_size
        self.flops_per_sample, self.world, self.peak_tflops = flops_per_sample, world, peak_tflops
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self._zero = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.micro = 0
        self.steps = 0
        self.data_s = 0.0
        self.excluded_s = 0.0
        self.t0 = time.perf_counter()

    def add_micro(self, values: dict[str, torch.Tensor], finite: torch.Tensor) -> None:
        """One micro-batch's losses (device scalars; the names it lacks count 0), if the total is finite."""
        stacked = torch.stack([values[n].detach().to(torch.float64) if n in values else self._zero
                               for n in self.names])
        self.sums += torch.where(finite, stacked, torch.zeros_like(stacked))
        self.micro += 1

    def add_data_wait(self, seconds: float) -> None:
        self.data_s += seconds

    def exclude(self, seconds: float) -> None:
        """Time inside the interval that was not training (evaluation, checkpoints)."""
        self.excluded_s += seconds

    def read(self) -> dict:
        """The interval's figures (collective: losses are averaged over every rank's micro-batches)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        counts = torch.cat([self.sums, torch.tensor([float(self.micro)], dtype=torch.float64, device=self.device)])
        all_reduce_sum(counts)
        micro_total = max(counts[-1].item(), 1.0)
        means = {n: v / micro_total for n, v in zip(self.names, counts[:-1].tolist())}
        elapsed = max(time.perf_counter() - self.t0 - self.excluded_s, 1e-9)
        sps = self.steps * self.train_batch_size / elapsed
        tflops, mfu = throughput(sps, self.flops_per_sample, self.world, self.peak_tflops) \
            if self.flops_per_sample else (None, None)
        return {"means": means, "samples_per_s": sps, "tflops": tflops, "mfu": mfu,
                "data_wait": self.data_s / elapsed, "train_seconds": elapsed}
