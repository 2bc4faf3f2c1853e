"""LXMERT's layers, with HuggingFace's module names (so state dicts map one to one) except:

- every attention's query/key/value projections are ONE `qkv` Linear (3*hidden rows: q, k, v);
- the cross-modality attention (`visual_attention`, weights shared by both directions) projects
  the concatenated [lang; vision] tokens once, runs both directions through
  `AttentionDispatcher.cross_pair`, and finishes both with one output dense + residual LayerNorm.

All layers share one `ModelContext`: the attention dispatcher and the fused-op implementation,
so that `LxmertModel.set_attention_backend` / `set_kernels` switch every layer at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from lxmert_fast.config import LxmertConfig
from lxmert_fast.model.attention import AttentionDispatcher, KeyMask, PairKeyMask, key_mask
from lxmert_fast.model.fused_ops import TorchOps

Tensor = torch.Tensor


@dataclass
class ModelContext:
    """Shared, non-parameter state of a model: which attention backend and fused ops to use."""

    dispatcher: AttentionDispatcher
    ops: TorchOps


class LxmertEmbeddings(nn.Module):
    """LN(word + position + token_type), then dropout."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=0)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids_bl: Optional[Tensor], token_type_ids_bl: Tensor,
                inputs_embeds_bld: Optional[Tensor] = None) -> Tensor:
        if inputs_embeds_bld is None:
            inputs_embeds_bld = self.word_embeddings(input_ids_bl)
        seq_len = inputs_embeds_bld.shape[1]
        if seq_len > self.max_positions:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings={self.max_positions}"
            )
        position_ids_l = torch.arange(seq_len, dtype=torch.long, device=inputs_embeds_bld.device)
        embeddings_bld = (
            inputs_embeds_bld
            + self.position_embeddings(position_ids_l)[None]
            + self.token_type_embeddings(token_type_ids_bl)
        )
        return self.dropout(self.LayerNorm(embeddings_bld))


class LxmertVisualFeatureEncoder(nn.Module):
    """v = (LN(W_f f + b_f) + LN(W_p p + b_p)) / 2, then dropout."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visn_fc = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.box_fc = nn.Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, visual_feats_bnf: Tensor, visual_pos_bnp: Tensor) -> Tensor:
        feats_bnd = self.visn_layer_norm(self.visn_fc(visual_feats_bnf))
        boxes_bnd = self.box_layer_norm(self.box_fc(visual_pos_bnp))
        return self.dropout((feats_bnd + boxes_bnd) / 2)


class LxmertQKV(nn.Module):
    """One Linear(hidden -> 3*hidden) producing packed (B, L, 3, H, D) queries, keys and values."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x_bld: Tensor) -> Tensor:
        batch, length, _ = x_bld.shape
        return self.qkv(x_bld).view(batch, length, 3, self.num_heads, self.head_dim)


class LxmertResidualOutput(nn.Module):
    """dense (in_features -> hidden) -> dropout -> LayerNorm(+ residual): the output of every attention
    (in_features = hidden; HF's LxmertAttentionOutput) and of every FFN (in_features = intermediate;
    HF's LxmertOutput). The same parameter names as both."""

    def __init__(self, config: LxmertConfig, ctx: ModelContext, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout_p = config.hidden_dropout_prob
        self._ctx = ctx

    def forward(self, x_bli: Tensor, residual_bld: Tensor) -> Tensor:
        p = self.dropout_p if self.training else 0.0
        return self._ctx.ops.residual_layer_norm(self.dense(x_bli), residual_bld, self.LayerNorm, p)


class LxmertAttentionBlock(nn.Module):
    """What the self- and the cross-attention layers share besides their modules: the attention
    probabilities' dropout (while training), the softmax scale 1/sqrt(head_dim) and the context."""

    def __init__(self, config: LxmertConfig, ctx: ModelContext):
        super().__init__()
        self.attn_dropout_p = config.attention_probs_dropout_prob
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self._ctx = ctx

    def attention_dropout(self) -> float:
        """The dropout of this call's attention probabilities: the config's while training, else 0."""
        return self.attn_dropout_p if self.training else 0.0


class LxmertSelfAttentionLayer(LxmertAttentionBlock):
    """Self-attention (`self.qkv`) + output projection + residual LayerNorm."""

    def __init__(self, config: LxmertConfig, ctx: ModelContext):
        super().__init__(config, ctx)
        self.self = LxmertQKV(config)
        self.output = LxmertResidualOutput(config, ctx, config.hidden_size)

    def forward(self, x_bld: Tensor, key_padding_mask_bl: Optional[KeyMask | Tensor],
                need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        qkv_bl3hd = self.self(x_bld)
        ctx_blhd, probs = self._ctx.dispatcher.attention_qkv(qkv_bl3hd, key_padding_mask_bl, self.attention_dropout(),
                                                             self.scale, need_weights)
        ctx_bld = ctx_blhd.reshape(x_bld.shape)
        return self.output(ctx_bld, x_bld), probs

    def forward_rows(self, x_bld: Tensor, key_padding_mask_bl: Optional[KeyMask | Tensor], rows_m: Tensor) -> Tensor:
        """The layer's output at flat rows ``rows_m`` (``b * L + t``) only: ``(M, d)``.

        Keys and values come from every position of the row's sequence, as in :meth:`forward`;
        only the queries, the output projection and its residual LayerNorm are restricted. Each
        row is run through the attention backend as a one-query sequence of its own.
        """
        batch, length, hidden = x_bld.shape
        qkv_bl3hd = self.self(x_bld)
        b_m = torch.div(rows_m, length, rounding_mode="floor")
        q_m1hd = qkv_bl3hd.reshape(batch * length, *qkv_bl3hd.shape[2:]).index_select(0, rows_m)[:, 0:1]  # q
        kv_ml2hd = qkv_bl3hd[:, :, 1:].index_select(0, b_m)
        mask = key_mask(key_padding_mask_bl)
        mask_ml = None if mask is None else mask.rows(b_m)
        ctx_m1hd, _ = self._ctx.dispatcher.attention(
            q_m1hd, kv_ml2hd[:, :, 0], kv_ml2hd[:, :, 1], mask_ml, self.attention_dropout(), self.scale, False
        )
        x_md = x_bld.reshape(batch * length, hidden).index_select(0, rows_m)
        return self.output(ctx_m1hd.reshape(x_md.shape), x_md)


class LxmertCrossAttentionLayer(LxmertAttentionBlock):
    """Bidirectional cross-attention with ONE set of weights (LXMERT's `visual_attention`).

    Both directions read the layer's inputs; one QKV projection of [lang; vision], one output
    projection + residual LayerNorm over [lang; vision].
    """

    def __init__(self, config: LxmertConfig, ctx: ModelContext):
        super().__init__(config, ctx)
        self.att = LxmertQKV(config)
        self.output = LxmertResidualOutput(config, ctx, config.hidden_size)

    def forward(self, lang_btd: Tensor, vis_bvd: Tensor, key_padding_mask_bs: Optional[PairKeyMask | Tensor],
                need_weights: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        n_lang = lang_btd.shape[1]
        joint_bsd = torch.cat([lang_btd, vis_bvd], dim=1)
        qkv_bs3hd = self.att(joint_bsd)
        ctx_bshd, lang_probs = self._ctx.dispatcher.cross_pair(
            qkv_bs3hd, n_lang, key_padding_mask_bs, self.attention_dropout(), self.scale, need_weights
        )
        out_bsd = self.output(ctx_bshd.reshape(joint_bsd.shape), joint_bsd)
        return out_bsd[:, :n_lang], out_bsd[:, n_lang:], lang_probs


class LxmertIntermediate(nn.Module):
    """dense -> erf GELU."""

    def __init__(self, config: LxmertConfig, ctx: ModelContext):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self._ctx = ctx

    def forward(self, x_bld: Tensor) -> Tensor:
        return self._ctx.ops.linear_gelu(x_bld, self.dense)


class LxmertLayer(GradientCheckpointingLayer):
    """A single-modality encoder layer: self-attention then FFN (post-LN). transformers'
    `GradientCheckpointingLayer`: with activation checkpointing on (and gradients flowing while training),
    its forward runs inside the model's checkpoint function."""

    def __init__(self, config: LxmertConfig, ctx: ModelContext):
        super().__init__()
        self.attention = LxmertSelfAttentionLayer(config, ctx)
        self.intermediate = LxmertIntermediate(config, ctx)
        self.output = LxmertResidualOutput(config, ctx, config.intermediate_size)

    def forward(self, x_bld: Tensor, key_padding_mask_bl: Optional[KeyMask | Tensor],
                need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        att_bld, probs = self.attention(x_bld, key_padding_mask_bl, need_weights)
        return self.output(self.intermediate(att_bld), att_bld), probs


class LxmertXLayer(GradientCheckpointingLayer):
    """Cross-modality layer: shared bidirectional cross-attention, per-modality self-attention, per-modality FFN.
    A `GradientCheckpointingLayer`, as `LxmertLayer`."""

    def __init__(self, config: LxmertConfig, ctx: ModelContext):
        super().__init__()
        self.visual_attention = LxmertCrossAttentionLayer(config, ctx)
        self.lang_self_att = LxmertSelfAttentionLayer(config, ctx)
        self.visn_self_att = LxmertSelfAttentionLayer(config, ctx)
        self.lang_inter = LxmertIntermediate(config, ctx)
        self.lang_output = LxmertResidualOutput(config, ctx, config.intermediate_size)
        self.visn_inter = LxmertIntermediate(config, ctx)
        self.visn_output = LxmertResidualOutput(config, ctx, config.intermediate_size)

    def forward(self, lang_btd: Tensor, lang_mask_bt: Optional[KeyMask | Tensor], vis_bvd: Tensor,
                vis_mask_bv: Optional[KeyMask | Tensor], joint_mask_bs: Optional[PairKeyMask | Tensor],
                need_weights: bool = False, lang_rows_m: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``lang_rows_m`` (flat ``b * T + t`` indices): return the language output at those rows
        only, ``(M, d)``; the cross-attention still runs on every token (the language
        self-attention reads them all as keys and values)."""
        lang_btd, vis_bvd, cross_probs = self.visual_attention(lang_btd, vis_bvd, joint_mask_bs, need_weights)
        if lang_rows_m is not None:
            lang_md = self.lang_self_att.forward_rows(lang_btd, lang_mask_bt, lang_rows_m)
            vis_bvd, _ = self.visn_self_att(vis_bvd, vis_mask_bv)
            lang_md = self.lang_output(self.lang_inter(lang_md), lang_md)
            vis_bvd = self.visn_output(self.visn_inter(vis_bvd), vis_bvd)
            return lang_md, vis_bvd, cross_probs
        lang_btd, _ = self.lang_self_att(lang_btd, lang_mask_bt)
        vis_bvd, _ = self.visn_self_att(vis_bvd, vis_mask_bv)
        lang_btd = self.lang_output(self.lang_inter(lang_btd), lang_btd)
        vis_bvd = self.visn_output(self.visn_inter(vis_bvd), vis_bvd)
        return lang_btd, vis_bvd, cross_probs
