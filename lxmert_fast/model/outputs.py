"""Model outputs: transformers' own LXMERT `ModelOutput` classes, with our one addition after their fields.

`LxmertModelOutput` and `LxmertForQuestionAnsweringOutput` are transformers' classes themselves.
`LxmertForPreTrainingOutput` subclasses transformers' and adds `losses` last: each task's loss
("mlm", "matched", "obj", "attr", "feat", "qa") as added into `loss`, None without labels, so the
fields before it, their order and positional indexing are transformers'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.modeling_outputs import ModelOutput
from transformers.models.lxmert.modeling_lxmert import (
    LxmertForPreTrainingOutput as _HFLxmertForPreTrainingOutput,
)
from transformers.models.lxmert.modeling_lxmert import (
    LxmertForQuestionAnsweringOutput,
    LxmertModelOutput,
)

Tensor = torch.Tensor

__all__ = ["LxmertForNLVR2Output", "LxmertForPreTrainingOutput", "LxmertForQuestionAnsweringOutput",
           "LxmertModelOutput"]


@dataclass
class LxmertForPreTrainingOutput(_HFLxmertForPreTrainingOutput):
    # Each task's loss, as added into `loss` (None when no labels were given).
    losses: Optional[dict[str, Tensor]] = None


@dataclass
class LxmertForNLVR2Output(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None          # (B, 2)
    pooled_output: Optional[Tensor] = None   # (B, 2 hid): [pooled(img0) | pooled(img1)]
