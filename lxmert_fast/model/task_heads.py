"""Fine-tuning heads and losses (VQA, GQA, NLVR2). Loading checkpoints into them: lxmert_fast/checkpoints/task.py.

Models:
- VQA / GQA: :class:`~lxmert_fast.model.lxmert.LxmertForQuestionAnswering` with
  ``num_qa_labels`` = the task's answers (the original's QA head: hid -> 2 hid, GELU, LN -> K);
  its saves are transformers ``LxmertForQuestionAnswering`` directories.
- NLVR2: :class:`LxmertForNLVR2`: each of the two images is encoded with the same sentence, the
  two pooled outputs are concatenated (B, 2 hid) -> Linear(2 hid, 2 hid), GELU, LN,
  Linear(2 hid, 2) (the original ``logit_fc``).

Losses (the original code's): VQA ``BCEWithLogits(logits, soft scores)`` averaged over batch x
answers, times the number of answers; GQA cross-entropy on the top answer (optionally the VQA
loss, the released default); NLVR2 cross-entropy.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lxmert_fast.config import LxmertConfig
from lxmert_fast.model.lxmert import LxmertForQuestionAnswering, LxmertModel, LxmertPreTrainedModel
from lxmert_fast.model.outputs import LxmertForNLVR2Output

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- models
class LxmertForNLVR2(LxmertPreTrainedModel):
    """LXMERT for NLVR2: two images per example, one sentence, a 2-way classifier on both pooled outputs."""

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        config = self.config
        hid = config.hidden_size
        self.lxmert = LxmertModel(config, init_weights=False)
        self.logit_fc = nn.Sequential(
            nn.Linear(hid * 2, hid * 2), nn.GELU(), nn.LayerNorm(hid * 2, eps=1e-12), nn.Linear(hid * 2, 2)
        )
        self.post_init()

    def forward(self, input_ids: Tensor, visual_feats: Tensor, visual_pos: Tensor,
                attention_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                visual_attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                return_dict: Optional[bool] = None):
        """``visual_feats`` (B, 2, N, D), ``visual_pos`` (B, 2, N, 4); text (B, T) shared by both images."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if visual_feats.dim() != 4 or visual_feats.shape[1] != 2:
            raise ValueError(f"visual_feats {tuple(visual_feats.shape)}: expected (B, 2, N, D), two images per example")
        b, _, n, d = visual_feats.shape
        rep = lambda x: None if x is None else x.repeat_interleave(2, dim=0)  # noqa: E731  [s0, s0, s1, s1, ...]
        vmask = None if visual_attention_mask is None else visual_attention_mask.reshape(b * 2, n)
        out = self.lxmert(input_ids=rep(input_ids), visual_feats=visual_feats.reshape(b * 2, n, d),
                          visual_pos=visual_pos.reshape(b * 2, n, visual_pos.shape[-1]),
                          attention_mask=rep(attention_mask), token_type_ids=rep(token_type_ids),
                          visual_attention_mask=vmask, return_dict=True)
        pooled = out.pooled_output.reshape(b, 2 * self.config.hidden_size)
        logits = self.logit_fc(pooled)
        loss = ce_loss(logits, labels) if labels is not None else None
        if not return_dict:
            return ((loss,) if loss is not None else ()) + (logits,)
        return LxmertForNLVR2Output(loss=loss, logits=logits, pooled_output=pooled)


def vqa_loss(logits_bk: Tensor, target_bk: Tensor) -> Tensor:
    """BCEWithLogits on soft scores, mean over batch x answers, times the number of answers (original)."""
    return F.binary_cross_entropy_with_logits(logits_bk.float(), target_bk.float()) * logits_bk.shape[1]


def ce_loss(logits_bc: Tensor, label_b: Tensor) -> Tensor:
    """Mean cross-entropy over labels >= 0 (0 when there are none)."""
    valid = label_b >= 0
    summed = F.cross_entropy(logits_bc.float(), label_b.masked_fill(~valid, -100), reduction="sum", ignore_index=-100)
    return summed / valid.sum().clamp(min=1).to(summed.dtype)


def task_loss(task: str, logits: Tensor, batch: dict, gqa_loss: str = "ce") -> Tensor:
    if task == "vqa" or (task == "gqa" and gqa_loss == "bce"):
        return vqa_loss(logits, batch["target"])
    return ce_loss(logits, batch["label"])


def build_task_model(task: str, config: LxmertConfig, num_answers: Optional[int] = None) -> nn.Module:
    """A freshly initialised task model (the encoder is then loaded by :func:`load_task_weights`)."""
    if task == "nlvr2":
        return LxmertForNLVR2(config)
    if task in ("vqa", "gqa"):
        if not num_answers:
            raise ValueError(f"{task}: the number of answers is needed")
        return LxmertForQuestionAnswering(config.replace(num_qa_labels=int(num_answers), task_qa=True))
    raise ValueError(f"unknown task {task!r}: expected vqa, gqa or nlvr2")


def task_logits(task: str, model: nn.Module, batch: dict, dtype: torch.dtype = torch.float32) -> Tensor:
    """Forward the model inputs of a task batch; (B, K) answer logits or (B, 2) NLVR2 logits."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch["token_type_ids"], visual_feats=batch["visual_feats"].to(dtype),
                  visual_pos=batch["visual_pos"].to(dtype))
    out = model(**inputs)
    return out.logits if task == "nlvr2" else out.question_answering_score
