"""Validation metrics of pre-training, and the grounding check.

`PretrainEval` accumulates, over held-out batches, the accuracy of every pre-training head:
masked words (argmax of the MLM logits at the masked positions), cross-modality matching,
detected object / attribute labels at the masked objects (argmax vs the detector's label) and
image QA (argmax vs the sampled answer, matched pairs with an answer). Counts are kept in one
float64 tensor so that ranks add them with a single all_reduce.

`grounding_counts` asks whether the model reads the image: in captions of matched pairs the
object and colour words are all replaced by [MASK] (nothing else is masked) and predicted once
with the pair's own image and once with the image of another row of the batch. A model that
grounds its words scores clearly higher with the true image.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as tdist

Tensor = torch.Tensor

EVAL_FIELDS = ("loss", "batches", "mlm_correct", "mlm_total", "matched_correct", "matched_total",
               "obj_correct", "obj_total", "attr_correct", "attr_total", "qa_correct", "qa_total")


def _all_reduce_sum(t: Tensor) -> Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


class PretrainEval:
    """Accumulates validation counts; `result()` (collective) gives accuracies and the mean loss."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(len(EVAL_FIELDS), dtype=torch.float64, device=device)
        self._ix = {name: i for i, name in enumerate(EVAL_FIELDS)}

    def _add(self, name: str, value) -> None:
        self.counts[self._ix[name]] += value if isinstance(value, Tensor) else float(value)

    def _add_hits(self, name: str, scores: Tensor, target: Tensor, keep: Optional[Tensor] = None) -> None:
        """`name`_correct += how many kept positions have argmax(scores) == target; `name`_total += how
        many are kept (every position when `keep` is None)."""
        hit = scores.argmax(-1) == target
        if keep is None:
            keep = torch.ones_like(hit)
        self._add(f"{name}_correct", (hit & keep).sum().double())
        self._add(f"{name}_total", keep.sum().double())

    @torch.no_grad()
    def update(self, batch: dict, out, obj_scores: Optional[dict[str, Tensor]] = None) -> None:
        """`out`: the model's output in eval mode (full MLM logits); `obj_scores`: the object head's outputs."""
        if out.loss is not None:
            self._add("loss", out.loss.detach().double())
        self._add("batches", 1)
        labels_bl = batch.get("labels")
        if labels_bl is not None and out.prediction_logits is not None:
            self._add_hits("mlm", out.prediction_logits, labels_bl, labels_bl >= 0)
        matched_b = batch.get("matched_label")
        if matched_b is not None and out.cross_relationship_score is not None:
            self._add_hits("matched", out.cross_relationship_score, matched_b)
        obj_labels = batch.get("obj_labels")
        if obj_scores and obj_labels is not None and "feat" in obj_labels:
            masked_bn = obj_labels["feat"][1] > 0
            for name in ("obj", "attr"):
                if name in obj_scores and name in obj_labels:
                    self._add_hits(name, obj_scores[name], obj_labels[name][0], masked_bn)
        ans_b = batch.get("ans")
        if ans_b is not None and out.question_answering_score is not None:
            self._add_hits("qa", out.question_answering_score, ans_b, ans_b >= 0)

    def result(self) -> dict[str, float]:
        counts = _all_reduce_sum(self.counts.clone()).tolist()
        c = dict(zip(EVAL_FIELDS, counts))
        res: dict[str, float] = {}
        if c["batches"]:
            res["loss"] = c["loss"] / c["batches"]
        for name in ("mlm", "matched", "obj", "attr", "qa"):
            if c[f"{name}_total"]:
                res[f"{name}_acc"] = c[f"{name}_correct"] / c[f"{name}_total"]
        return res


def mask_target_words(input_ids_bl: Tensor, target_ids: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """Replace every token in `target_ids` by [MASK]; labels hold them (-100 elsewhere)."""
    hit = torch.isin(input_ids_bl, target_ids.to(input_ids_bl.device))
    labels = torch.where(hit, input_ids_bl, torch.full_like(input_ids_bl, -100))
    return torch.where(hit, torch.full_like(input_ids_bl, mask_id), input_ids_bl), labels


@torch.no_grad()
def grounding_counts(forward: Callable[..., object], batches: Iterable[dict],
                     maskers: dict[str, Callable[[dict], tuple[Tensor, Tensor]]], device: torch.device,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Counts (float64): matched_correct, matched_total, then per masker correct_true, total_true,
    correct_shuffled, total_shuffled.

    `batches`: raw (unmasked) pre-training batches with `img_index` and `matched_label`.
    `maskers`: name -> ``mask(raw batch) -> (masked ids, labels (-100 = not predicted))``: which words
    each measure predicts (e.g. the object and colour words of the demo world, or a random 15%).
    `forward(**inputs)` returns an output with `prediction_logits` and `cross_relationship_score`.
    Words are counted in matched pairs only. Shuffled: row i gets the features and boxes of row i+1
    (rolled); rows whose rolled image is the same image are left out of the shuffled count.
    """
    counts = torch.zeros(2 + 4 * len(maskers), dtype=torch.float64, device=device)
    for raw in batches:
        raw = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in raw.items()}
        keep = raw["matched_label"] == 1
        feats, pos = raw["visual_feats"].to(dtype), raw["visual_pos"].to(dtype)
        common = dict(attention_mask=raw["attention_mask"], token_type_ids=raw["token_type_ids"])
        # matching accuracy on the unmasked pairs (positives and negatives)
        out = forward(input_ids=raw["input_ids"], visual_feats=feats, visual_pos=pos, **common)
        counts[0] += (out.cross_relationship_score.argmax(-1) == raw["matched_label"]).sum().double()
        counts[1] += raw["matched_label"].numel()
        for m, mask in enumerate(maskers.values()):
            ids, labels = mask(raw)
            for shuffled in (False, True):
                f, p, rows = feats, pos, keep
                if shuffled:
                    f, p = feats.roll(1, dims=0), pos.roll(1, dims=0)
                    rows = keep & (raw["img_index"].roll(1, dims=0) != raw["img_index"])
                out = forward(input_ids=ids, visual_feats=f, visual_pos=p, **common)
                picked = (labels >= 0) & rows[:, None]
                correct = ((out.prediction_logits.argmax(-1) == labels) & picked).sum().double()
                base = 2 + 4 * m + (2 if shuffled else 0)
                counts[base] += correct
                counts[base + 1] += picked.sum().double()
    return counts


def grounding_result(counts: Tensor, names: Iterable[str]) -> dict[str, float]:
    """Per masker its accuracies with the true and the shuffled images and its word counts (keys: see
    GROUNDING_KEYS), and ``matched_acc``, ``matched_pairs``. Collective."""
    c = _all_reduce_sum(counts.clone()).tolist()
    res = {"matched_acc": c[0] / max(c[1], 1.0), "matched_pairs": c[1]}
    for m, name in enumerate(names):
        t, n, ts, ns = c[2 + 4 * m: 6 + 4 * m]
        acc, count = GROUNDING_KEYS.get(name, (name, name))
        res.update({f"{acc}_acc_true_image": t / max(n, 1.0), f"{acc}_acc_shuffled_image": ts / max(ns, 1.0),
                    f"{count}_true": n, f"{count}_shuffled": ns})
    return res


# measure -> (accuracy key prefix, count key prefix): the demo world's object and colour words give
# word_acc_true_image / words_true ..., a random 15% of the words masked_acc_true_image / masked_words_true ...
GROUNDING_KEYS = {"named_words": ("word", "words"), "masked_words": ("masked", "masked_words")}
