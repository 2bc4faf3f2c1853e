"""Analytic training FLOPs of LXMERT pre-training, and TFLOP/s / MFU from them.

Counting convention (as LXMERT.md and the usual "6 N" rule): training FLOPs = 6 x the forward
pass's multiply-adds (one multiply-add = 2 FLOPs; backward = 2 x forward). Every matrix product
is counted, attention scores (Q K^T) and the attention-weighted values (P V) included; the
element-wise work (softmax, LayerNorm, GELU, dropout, losses) is not.

LXMERT-base at 20 tokens / 36 objects: ~35.5 GFLOP per sample with the MLM decoder on every
token (transformers' model), ~33 GFLOP with it only on the masked 15%, and ~32.2 GFLOP for what our
model computes while training: besides, the last cross layer's language side runs only at [CLS]
and the masked words (the rows the heads read), and the feature-regression decoder only at the
masked objects (the only ones its loss weighs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lxmert_fast.config import LxmertConfig

# Dense bf16/fp16 matrix peak in TFLOP/s (no sparsity), by a substring of the device name.
# Order matters: the first match wins. Figures: vendors' data sheets (SXM / full-power parts).
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("V100", 125.0),  # fp16 tensor cores (no bf16)
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("TITAN Xp", 12.1),  # fp32, no tensor cores
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward multiply-adds per sample, by part of the model."""

    embeddings: int
    language_layers: int
    vision_layers: int
    cross_layers: int
    pooler: int
    mlm_head: int
    matching_head: int
    object_head: int
    qa_head: int

    @property
    def encoder_macs(self) -> int:
        """The encoders and the pooler: what every task shares."""
        return self.embeddings + self.language_layers + self.vision_layers + self.cross_layers + self.pooler

    @property
    def forward_macs(self) -> int:
        return (self.embeddings + self.language_layers + self.vision_layers + self.cross_layers + self.pooler
                + self.mlm_head + self.matching_head + self.object_head + self.qa_head)

    @property
    def train_flops(self) -> int:
        """6 x forward multiply-adds: forward (2 FLOPs per multiply-add) + backward (twice the forward)."""
        return 6 * self.forward_macs


def _self_layer_macs(tokens: int, hidden: int, inter: int) -> int:
    """Self-attention (packed QKV, scores, P V, output projection) + FFN over `tokens` tokens."""
    projections = 4 * tokens * hidden * hidden  # Q, K, V and the output dense
    scores = 2 * tokens * tokens * hidden  # Q K^T and P V, summed over heads
    ffn = 2 * tokens * hidden * inter
    return projections + scores + ffn


def _rows_self_layer_macs(tokens: int, rows: float, hidden: int, inter: int) -> float:
    """A self-attention layer + FFN whose output is needed at `rows` of its `tokens` positions:
    QKV for every token (keys and values); queries, scores, output projection and FFN at the rows."""
    return 3 * tokens * hidden * hidden + rows * (hidden * hidden + 2 * tokens * hidden + 2 * hidden * inter)


def _cross_layer_macs(lang: int, objs: int, hidden: int, inter: int, lang_rows: Optional[float] = None) -> float:
    """One cross-modality layer: shared bidirectional cross-attention, two self-attentions, two FFNs.
    `lang_rows`: the language side's output is computed at that many positions only (None = all)."""
    joint = lang + objs
    cross = 4 * joint * hidden * hidden + 2 * (2 * lang * objs * hidden)  # QKV+out on [lang; vis]; both directions
    lang_side = (_self_layer_macs(lang, hidden, inter) if lang_rows is None
                 else _rows_self_layer_macs(lang, lang_rows, hidden, inter))
    return cross + lang_side + _self_layer_macs(objs, hidden, inter)


def flop_breakdown(config: LxmertConfig, seq_len: int = 20, num_objects: int = 36,
                   mlm_tokens: Optional[float] = None, masked_objects: Optional[float] = None) -> FlopBreakdown:
    """Forward multiply-adds per sample.

    `mlm_tokens`: how many positions the MLM decoder runs on; None = every token (`seq_len`), as
    transformers' model. Given, it counts what our model computes while training: the decoder at
    those positions and the last cross layer's language side at them plus [CLS].
    `masked_objects`: how many objects the masked-only object outputs (feat; obj and attr too with
    obj_label_loss="masked") are decoded at; None = every object (transformers' model).
    Ours while training: `word_mask_rate * seq_len` and `obj_mask_rate * num_objects`.
    The heads of disabled tasks cost nothing.
    """
    d, inter = config.hidden_size, config.intermediate_size
    t, n = seq_len, num_objects
    mlm_n = float(t if mlm_tokens is None else mlm_tokens)
    lang_rows = None if mlm_tokens is None else 1.0 + (mlm_n if config.task_mask_lm else 0.0)
    embeddings = n * (config.visual_feat_dim + config.visual_pos_dim) * d
    language = config.l_layers * _self_layer_macs(t, d, inter)
    vision = config.r_layers * _self_layer_macs(n, d, inter)
    cross = 0.0
    for i in range(config.x_layers):
        cross += _cross_layer_macs(t, n, d, inter, lang_rows if i == config.x_layers - 1 else None)
    pooler = d * d
    mlm = int(round(mlm_n * (d * d + d * config.vocab_size))) if config.task_mask_lm else 0
    matching = 2 * d if config.task_matched else 0
    obj = 0.0
    if config.task_obj_predict and config.visual_losses:
        dims = config.visual_loss_dims()
        masked_names = set(config.masked_visual_losses)
        at_masked = float(n if masked_objects is None else masked_objects)
        dense = sum(v for k, v in dims.items() if k not in masked_names)
        sparse = sum(v for k, v in dims.items() if k in masked_names)
        transform_rows = n if dense else at_masked
        obj = transform_rows * d * d + n * d * dense + at_masked * d * sparse
    qa = (d * 2 * d + 2 * d * config.num_qa_labels) if config.task_qa else 0
    return FlopBreakdown(embeddings, language, vision, int(round(cross)), pooler, mlm, matching, int(round(obj)), qa)


def train_flops_per_sample(config: LxmertConfig, seq_len: int = 20, num_objects: int = 36,
                           mlm_tokens: Optional[float] = None, masked_objects: Optional[float] = None) -> int:
    """Training FLOPs (forward + backward) for one sample; see `flop_breakdown`."""
    return flop_breakdown(config, seq_len, num_objects, mlm_tokens, masked_objects).train_flops


def peak_tflops_for(device_name: str) -> Optional[float]:
    """The bf16 dense peak for a device name from the table, or None when unknown (CPUs)."""
    for key, value in PEAK_TFLOPS_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def throughput(samples_per_s: float, flops_per_sample: float, num_devices: int = 1,
               peak_tflops: Optional[float] = None) -> tuple[float, Optional[float]]:
    """(achieved TFLOP/s per device, MFU in [0, 1] or None when the peak is unknown)."""
    per_device = samples_per_s * flops_per_sample / max(1, num_devices) / 1e12
    mfu = per_device / peak_tflops if peak_tflops else None
    return per_device, mfu
