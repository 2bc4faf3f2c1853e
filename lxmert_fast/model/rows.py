"""The rows the pre-training heads read, selected with sizes fixed by the batch's shape.

While training with labels, the MLM decoder and the last cross layer's language side run only at
[CLS] and the masked words, and the masked-only object outputs only at the masked objects. How
many words and objects are masked is random (a binomial count), so selecting exactly those rows
gives tensors whose size depends on the batch's content: `torch.compile` must break the graph
there, and a CUDA graph cannot capture it. A `RowBudget` fixes the sizes instead:

* `RowBudget.for_batch(...)` gives each selection room for the expected count plus a wide margin
  (`sigmas` standard deviations of the binomial count, 6 by default: a batch exceeds it with a
  probability below 1e-9). The rows are gathered with a static-size index; unused slots repeat a
  real row and weigh 0, so losses and gradients are those of the exact selection.
* `RowBudget.full(...)` has room for every row: never exceeded, no FLOP savings.
* A batch with more masked rows than its budget is never truncated silently: the model checks
  the count on the device (`torch._assert_async`, no host read) and fails loudly. Who knows the
  counts on the host before the step (the pre-training recipe does: `PretrainRecipe._row_budget` in `lxmert_fast/pretrain.py`) picks
  `full` for such a batch, which gives the exact loss.

Without a budget (`row_budget=None`) the eager model selects exactly the masked rows
(`nonzero`, content-sized, a host sync on a GPU); inside `torch.compile` it uses `full`, the
static exact choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor

ROW_ALIGN = 8  # budgets are rounded up to a multiple of this (aligned matrix shapes)


def binomial_budget(trials: int, rate: float, sigmas: float) -> int:
    """Room for a Binomial(trials, rate) count: mean + sigmas * std, rounded up, at most `trials`."""
    if trials < 0 or not 0.0 <= rate <= 1.0 or sigmas < 0:
        raise ValueError(f"binomial_budget: trials {trials} >= 0, rate {rate} in [0, 1], sigmas {sigmas} >= 0 expected")
    mean = trials * rate
    std = math.sqrt(trials * rate * (1.0 - rate))
    room = math.ceil(mean + sigmas * std)
    room = -(-room // ROW_ALIGN) * ROW_ALIGN
    return max(0, min(trials, room))


@dataclass(frozen=True)
class RowBudget:
    """Static room for the masked rows of one batch shape.

    words: masked words (MLM labels >= 0) over the batch's ``B * T`` tokens;
    objects: masked objects (feature mask != 0) over its ``B * N`` objects.
    """

    words: int
    objects: int

    def __post_init__(self) -> None:
        if self.words < 0 or self.objects < 0:
            raise ValueError(f"RowBudget: words {self.words} and objects {self.objects} must be >= 0")

    @classmethod
    def for_batch(cls, batch: int, seq_len: int, num_objects: int, word_rate: float = 0.15,
                  obj_rate: float = 0.15, sigmas: float = 6.0) -> "RowBudget":
        """Room for the masked words and objects of a ``(batch, seq_len)`` / ``(batch, num_objects)``
        batch masked at these rates (every token counted as a candidate: an upper bound)."""
        return cls(binomial_budget(batch * seq_len, word_rate, sigmas),
                   binomial_budget(batch * num_objects, obj_rate, sigmas))

    @classmethod
    def full(cls, batch: int, seq_len: int, num_objects: int) -> "RowBudget":
        """Room for every row: exact for any batch of this shape."""
        return cls(batch * seq_len, batch * num_objects)

    def fits(self, masked_words: int, masked_objects: int) -> bool:
        return masked_words <= self.words and masked_objects <= self.objects


def select_rows(keep_n: Tensor, capacity: Optional[int], what: str) -> tuple[Tensor, Optional[Tensor]]:
    """Flat indices of the True entries of ``keep_n`` (ascending) and which slots are real.

    ``capacity=None``: exactly the True entries (content-sized), ``valid`` None (all real).
    ``capacity=k``: ``(k,)`` indices with static size; slots past the count repeat index 0 and
    ``valid_k`` is False there. More True entries than ``k`` fail loudly on the device
    (``torch._assert_async``): never a silent truncation. No host read either way for ``k``.
    """
    if capacity is None:
        return keep_n.nonzero().squeeze(1), None
    n = keep_n.shape[0]
    if capacity > n:
        capacity = n
    cum_n = torch.cumsum(keep_n.to(torch.int64), 0)               # kept entries up to and including n
    count = cum_n[-1] if n else torch.zeros((), dtype=torch.int64, device=keep_n.device)
    torch._assert_async(
        count <= capacity,
        f"{what}: more masked rows than the static row budget ({capacity}); pass a larger RowBudget "
        f"(RowBudget.full is exact for any batch)",
    )
    # slot j holds the first entry whose running count reaches j + 1 (n when there is none)
    wanted_k = torch.arange(1, capacity + 1, dtype=torch.int64, device=keep_n.device)
    rows_k = torch.searchsorted(cum_n, wanted_k)
    valid_k = rows_k < n
    return torch.where(valid_k, rows_k, torch.zeros_like(rows_k)), valid_k
