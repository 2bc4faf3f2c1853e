"""Pre-training and QA heads, and the pre-training loss (as transformers' LxmertForPreTraining).

Module names follow HuggingFace (`cls.predictions.transform.dense`, `obj_predict_head.transform`,
`answer_head.logit_fc.0` ...) except the object head, whose three decoders (obj, attr, feat)
are one Linear `obj_predict_head.decoder` whose output rows are [obj | attr | feat].

Label conventions: any negative label is ignored (HF's -100 and the original code's -1).
A task whose labels are all ignored in a batch contributes 0 (HF would give NaN).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lxmert_fast.config import LxmertConfig
from lxmert_fast.model.rows import select_rows

Tensor = torch.Tensor


class LxmertPredictionHeadTransform(nn.Module):
    """dense -> GELU -> LayerNorm."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class TiedDecoder(nn.Linear):
    """A Linear without bias whose weight the model ties to another parameter (the MLM decoder: the word
    embeddings); the model's init leaves it alone (it is initialised as what it is tied to), unless the
    config unties it (`tie_word_embeddings=False`, as transformers allows), when it is initialised as a Linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        pass  # replaced by the parameter it is tied to


class LxmertLMPredictionHead(nn.Module):
    """MLM head; its `decoder` weight is the word-embedding matrix (tied by the model, as in transformers)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        self.decoder = TiedDecoder(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_nd: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden_nd)) + self.bias


class LxmertPreTrainingHeads(nn.Module):
    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.predictions = LxmertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class LxmertVisualObjHead(nn.Module):
    """Object head: transform, then ONE decoder for the enabled [obj | attr | feat] outputs."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        self.dims = config.visual_loss_dims()
        self.decoder = nn.Linear(config.hidden_size, sum(self.dims.values()))

    def forward(self, vision_bnd: Tensor, masked_rows_m: Optional[Tensor] = None,
                masked_names: tuple[str, ...] = ()) -> dict[str, Tensor]:
        """``{name: scores (B, N, k)}``. With ``masked_rows_m`` (flat ``b * N + n`` indices), the
        outputs in ``masked_names`` (the last decoder rows) are decoded at those objects only:
        ``(M, k)`` (the others stay ``(B, N, k)``). (Computed here, inside the module's forward, so that ZeRO-3 has the
        decoder's weight gathered for the slices, in forward and in backward.)"""
        if masked_rows_m is None or not masked_names:
            scores_bnk = self.decoder(self.transform(vision_bnd))
            return dict(zip(self.dims, scores_bnk.split(list(self.dims.values()), dim=-1)))
        if type(self.decoder) is not nn.Linear:
            raise TypeError(f"obj_predict_head.decoder is a {type(self.decoder).__name__}: decoding at the masked objects "
                            f"(training with obj_labels) slices a plain nn.Linear's weight; put no adapter on it")
        names = list(self.dims)
        n_dense = len(names) - len(masked_names)
        if tuple(names[n_dense:]) != tuple(masked_names):
            raise ValueError(f"masked outputs {masked_names} are not the last decoder rows of {names}")
        batch, num, hidden = vision_bnd.shape
        vision_nd = vision_bnd.reshape(batch * num, hidden)
        weight_kd, bias_k = self.decoder.weight, self.decoder.bias
        scores: dict[str, Tensor] = {}
        start = 0  # the first decoder row of the next output
        if n_dense:  # one product per output: contiguous scores, which the cross-entropy reads without a copy
            states_nd = self.transform(vision_nd)
            for name in names[:n_dense]:
                stop = start + self.dims[name]
                scores[name] = F.linear(states_nd, weight_kd[start:stop], bias_k[start:stop]).view(batch, num, -1)
                start = stop
            states_md = states_nd.index_select(0, masked_rows_m)
        else:
            states_md = self.transform(vision_nd.index_select(0, masked_rows_m))
        masked_mk = F.linear(states_md, weight_kd[start:], bias_k[start:])
        scores.update(zip(names[n_dense:], masked_mk.split([self.dims[n] for n in names[n_dense:]], dim=-1)))
        return scores


class LxmertVisualAnswerHead(nn.Module):
    """QA head: 768 -> 1536, GELU, LayerNorm, -> num_labels (indices 0, 2, 3 hold the weights, as HF)."""

    def __init__(self, config: LxmertConfig, num_labels: int):
        super().__init__()
        hid = config.hidden_size
        self.logit_fc = nn.Sequential(
            nn.Linear(hid, hid * 2), nn.GELU(), nn.LayerNorm(hid * 2, eps=1e-12), nn.Linear(hid * 2, num_labels)
        )

    def forward(self, pooled_bd: Tensor) -> Tensor:
        return self.logit_fc(pooled_bd)


def masked_mean_cross_entropy(logits_nc: Tensor, labels_n: Tensor) -> Tensor:
    """Mean cross-entropy over labels >= 0 (0 when there are none)."""
    valid_n = labels_n >= 0
    summed = F.cross_entropy(logits_nc, labels_n.masked_fill(~valid_n, -100), reduction="sum", ignore_index=-100)
    return summed / valid_n.sum().clamp(min=1).to(summed.dtype)


def visual_losses(
    config: LxmertConfig,
    scores: dict[str, Tensor],
    obj_labels: dict[str, tuple[Tensor, Tensor]],
    masked_rows_m: Optional[Tensor] = None,
    masked_valid_m: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """The object-prediction losses, each multiplied by `visual_loss_normalizer` (HF/original maths).

    obj/attr: cross-entropy per object times the weight (detector confidence; with
    obj_label_loss="masked" also times the feature mask, i.e. masked objects only), mean over
    all B*N objects. feat: SmoothL1 averaged over the feature dims, times the feature mask,
    mean over all B*N objects. With `masked_rows_m` (flat `b * N + n` indices), the scores of
    `config.masked_visual_losses` are `(M, k)` at those objects only (the others weigh 0);
    `masked_valid_m` (bool (M,)) marks the slots that hold a row (the others weigh 0 too).
    """
    _check_obj_labels(config, obj_labels)
    feat_mask_n = obj_labels["feat"][1].reshape(-1) if "feat" in obj_labels else None
    at_rows = set(config.masked_visual_losses) if masked_rows_m is not None else set()
    losses = {}
    for name in config.visual_losses:
        target, weight = obj_labels[name]
        weight_n = weight.reshape(-1)
        count = weight_n.numel()  # B * N: the mean runs over every object
        pred = scores[name].reshape(-1, scores[name].shape[-1])
        target = target.reshape(count, -1) if name == "feat" else target.reshape(-1)
        if name != "feat" and config.obj_label_loss == "masked":
            weight_n = weight_n * feat_mask_n
        if name in at_rows:
            weight_n, target = weight_n.index_select(0, masked_rows_m), target.index_select(0, masked_rows_m)
            if masked_valid_m is not None:
                weight_n = weight_n * masked_valid_m.to(weight_n.dtype)
        if name == "feat":
            per_obj = F.smooth_l1_loss(pred, target.to(pred.dtype), reduction="none").mean(dim=1)
        else:
            per_obj = F.cross_entropy(pred, target, reduction="none")
        losses[name] = (per_obj * weight_n.to(per_obj.dtype)).sum() / count * config.visual_loss_normalizer
    return losses


def _check_obj_labels(config: LxmertConfig, obj_labels: dict) -> None:
    needed = set(config.visual_losses)
    if config.obj_label_loss == "masked" and needed & {"obj", "attr"}:
        needed.add("feat")
    missing = sorted(needed - set(obj_labels))
    if missing:
        raise KeyError(
            f"obj_labels lacks {missing}: expected a dict with (labels, weights) for each of {sorted(needed)}"
        )


def visual_losses_at_masked_objects(
    config: LxmertConfig,
    head: LxmertVisualObjHead,
    vision_bnd: Tensor,
    obj_labels: dict[str, tuple[Tensor, Tensor]],
    capacity: Optional[int] = None,
) -> dict[str, Tensor]:
    """``visual_losses(config, head(vision_bnd), obj_labels)``, decoding less: the outputs whose
    weight carries the feature mask (``config.masked_visual_losses``) are decoded only at the
    objects where that mask is non-zero (15% of them in pre-training); the others (obj and attr
    weighted by confidence alone) at every object, in one matrix product. The objects left out
    have weight 0, so the losses and their gradients are the same. ``capacity``: a static number
    of decoded slots (``RowBudget.objects``; see ``lxmert_fast.model.rows.select_rows``); None:
    exactly the masked objects.
    """
    _check_obj_labels(config, obj_labels)
    masked_names = config.masked_visual_losses
    if not masked_names:
        return visual_losses(config, head(vision_bnd), obj_labels)
    rows_m, valid_m = select_rows(obj_labels["feat"][1].reshape(-1) != 0, capacity, "masked objects (feat mask != 0)")
    return visual_losses(config, head(vision_bnd, rows_m, masked_names), obj_labels, rows_m, valid_m)
