"""Model outputs: dataclasses with HuggingFace's field names, readable by attribute or by key."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

Tensor = torch.Tensor


class _Output:
    """Attribute or `out["name"]` access; `to_tuple()` gives the non-None fields in order (like HF)."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.keys() if name != "losses")


@dataclass
class LxmertModelOutput(_Output):
    language_output: Optional[Tensor] = None  # (B, T, d)
    vision_output: Optional[Tensor] = None  # (B, V, d)
    pooled_output: Optional[Tensor] = None  # (B, d)
    language_hidden_states: Optional[tuple[Tensor, ...]] = None
    vision_hidden_states: Optional[tuple[Tensor, ...]] = None
    language_attentions: Optional[tuple[Tensor, ...]] = None
    vision_attentions: Optional[tuple[Tensor, ...]] = None
    cross_encoder_attentions: Optional[tuple[Tensor, ...]] = None


@dataclass
class LxmertForPreTrainingOutput(_Output):
    loss: Optional[Tensor] = None  # scalar: plain sum of the task losses
    prediction_logits: Optional[Tensor] = None  # (B, T, vocab); None when only masked positions were decoded
    cross_relationship_score: Optional[Tensor] = None  # (B, 2)
    question_answering_score: Optional[Tensor] = None  # (B, num_qa_labels)
    # (B, T, d); None when only masked positions were decoded (then the last layer's language
    # side ran at [CLS] and the masked words only)
    language_output: Optional[Tensor] = None
    vision_output: Optional[Tensor] = None
    pooled_output: Optional[Tensor] = None
    language_hidden_states: Optional[tuple[Tensor, ...]] = None
    vision_hidden_states: Optional[tuple[Tensor, ...]] = None
    language_attentions: Optional[tuple[Tensor, ...]] = None
    vision_attentions: Optional[tuple[Tensor, ...]] = None
    cross_encoder_attentions: Optional[tuple[Tensor, ...]] = None
    # Each task's loss ("mlm", "matched", "obj", "attr", "feat", "qa"), as added into `loss`.
    losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class LxmertForQuestionAnsweringOutput(_Output):
    loss: Optional[Tensor] = None
    question_answering_score: Optional[Tensor] = None  # (B, num_qa_labels)
    language_output: Optional[Tensor] = None
    vision_output: Optional[Tensor] = None
    pooled_output: Optional[Tensor] = None
    language_hidden_states: Optional[tuple[Tensor, ...]] = None
    vision_hidden_states: Optional[tuple[Tensor, ...]] = None
    language_attentions: Optional[tuple[Tensor, ...]] = None
    vision_attentions: Optional[tuple[Tensor, ...]] = None
    cross_encoder_attentions: Optional[tuple[Tensor, ...]] = None
