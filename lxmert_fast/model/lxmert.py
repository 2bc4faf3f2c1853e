"""LxmertModel, LxmertForPreTraining and LxmertForQuestionAnswering.

Drop-ins for transformers' classes: the same forward arguments and output field names, the
same maths (HF's eager attention is the `eager` backend), and checkpoints in HF's layout
(`save_pretrained` / `from_pretrained`, see convert.py). Built for speed inside: packed QKV
projections, both cross-attention directions from one projection, the MLM decoder only at
masked positions while training, and one fused decoder for the object heads.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lxmert_fast.config import LxmertConfig
from lxmert_fast.model.attention import AttentionDispatcher, PairKeyMask, key_mask
from lxmert_fast.model.fused_ops import make_ops
from lxmert_fast.model.heads import (
    LxmertLMPredictionHead,
    LxmertPreTrainingHeads,
    LxmertVisualAnswerHead,
    LxmertVisualObjHead,
    masked_mean_cross_entropy,
    visual_losses,
    visual_losses_at_masked_objects,
)
from lxmert_fast.model.layers import (
    LxmertEmbeddings,
    LxmertLayer,
    LxmertVisualFeatureEncoder,
    LxmertXLayer,
    ModelContext,
)
from lxmert_fast.model.outputs import (
    LxmertForPreTrainingOutput,
    LxmertForQuestionAnsweringOutput,
    LxmertModelOutput,
)
from lxmert_fast.model.rows import RowBudget, select_rows

Tensor = torch.Tensor


def _keep_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """HF-style 1/0 attention mask (any dtype) -> boolean key-padding mask, True = keep."""
    if mask is None:
        return None
    return mask if mask.dtype == torch.bool else mask != 0


class LxmertPreTrainedModel(nn.Module):
    """Shared machinery: config, weight init, backend switches, checkpoint I/O."""

    # HF architecture name written into config.json by save_pretrained.
    hf_architecture = "LxmertModel"
    # Prefix of this class's keys in an HF LxmertForPreTraining-style state dict ("" for heads).
    base_model_prefix = "lxmert"

    def __init__(self, config: LxmertConfig):
        super().__init__()
        config.validate()
        self.config = config

    # ----------------------------------------------------------------- init
    def init_weights(self) -> None:
        """normal(0, initializer_range) for Linear and Embedding, zero biases, LayerNorm (1, 0).

        Under ZeRO-3 (`deepspeed.zero.Init`) the parameters are already partitioned when this
        runs: each module's own parameters are gathered, initialised on rank 0 and re-partitioned.
        """
        partitioned = any(hasattr(p, "ds_id") for p in self.parameters())
        for module in self.modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if partitioned:
                import deepspeed  # only reachable when DeepSpeed partitioned the parameters

                with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                    self._init_module(module)
            else:
                self._init_module(module)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(mean=0.0, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(mean=0.0, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, LxmertLMPredictionHead):
                module.bias.zero_()

    # ----------------------------------------------------------------- switches
    @property
    def context(self) -> ModelContext:
        return self.lxmert.context

    def set_attention_backend(self, name: str) -> None:
        """eager | sdpa | triton | flash_attn | auto, for every layer."""
        self.context.dispatcher.set_backend(name)
        self.config.attention_backend = name

    def set_kernels(self, name: str) -> None:
        """torch | triton | apex implementation of the residual+LayerNorm and bias+GELU ops."""
        self.context.ops = make_ops(name)
        self.config.kernels = name

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every encoder layer (language, vision, cross) in backward instead of keeping its
        activations: each layer's forward runs inside torch's non-reentrant `torch.utils.checkpoint`, and only
        the layer's inputs are kept. The same loss and gradients, the same dropout masks (see
        `LxmertEncoder`); about one more forward's work per step. Applies while training with gradients on;
        evaluation and `torch.no_grad()` run the layers plainly. Not saved in the config (like
        transformers' gradient checkpointing, it is a training setting, not part of the model)."""
        encoders = [m for m in self.modules() if isinstance(m, LxmertEncoder)]
        if not encoders:
            raise ValueError(f"{type(self).__name__}: no LxmertEncoder to checkpoint")
        for encoder in encoders:
            encoder.activation_checkpointing = bool(enabled)

    @property
    def activation_checkpointing(self) -> bool:
        return any(m.activation_checkpointing for m in self.modules() if isinstance(m, LxmertEncoder))

    # transformers' names for the same switch
    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """transformers' spelling of `set_activation_checkpointing(True)`. Only the non-reentrant checkpoint
        is offered: ``gradient_checkpointing_kwargs`` may hold ``use_reentrant=False`` and nothing else."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise ValueError("gradient_checkpointing_kwargs use_reentrant=True: lxmert-fast checkpoints with torch's "
                             "non-reentrant checkpoint only (it runs inside torch.compile(fullgraph=True) and keeps "
                             "the dropout masks); drop use_reentrant")
        if kwargs:
            raise ValueError(f"gradient_checkpointing_kwargs {sorted(kwargs)}: not supported "
                             f"(only use_reentrant=False)")
        self.set_activation_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self.set_activation_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.activation_checkpointing

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], config: Optional[LxmertConfig] = None,
                        **config_overrides: Any):
        """Load an HF directory, an original `Epoch20_LXRT.pth`, or one of our checkpoints."""
        from lxmert_fast.model.convert import load_pretrained

        return load_pretrained(cls, path, config=config, **config_overrides)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write an HF directory: config.json + model.safetensors with HF key names."""
        from lxmert_fast.model.convert import save_pretrained

        save_pretrained(self, directory)


class LxmertModel(LxmertPreTrainedModel):
    """The LXMERT encoders and pooler. Returns language/vision sequences and the pooled output."""

    base_model_prefix = ""
    hf_architecture = "LxmertModel"

    def __init__(self, config: LxmertConfig, init_weights: bool = True):
        super().__init__(config)
        self._context = ModelContext(AttentionDispatcher(config.attention_backend), make_ops(config.kernels))
        self.embeddings = LxmertEmbeddings(config)
        self.encoder = LxmertEncoder(config, self._context)
        self.pooler = LxmertPooler(config)
        if init_weights:
            self.init_weights()

    @property
    def context(self) -> ModelContext:
        return self._context

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        visual_feats: Optional[Tensor] = None,
        visual_pos: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        visual_attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        language_rows: Optional[Tensor] = None,
    ) -> Union[LxmertModelOutput, tuple]:
        """HF's forward. ``language_rows`` (ours; ``(M,)`` flat indices ``b * T + t``, any order,
        repeats allowed): the last cross layer computes the language output at those rows and at
        the [CLS] rows only, for heads that read a few positions (the pre-training loss reads the
        masked words and [CLS]). ``language_output`` is then ``(M, d)`` in the order given; the
        pooled output is exact. Not with ``output_hidden_states`` / ``output_attentions``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, d)")
        if visual_feats is None or visual_pos is None:
            raise ValueError("visual_feats (B, N, visual_feat_dim) and visual_pos (B, N, visual_pos_dim) are required")
        shape_bt = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if visual_feats.shape[-1] != self.config.visual_feat_dim or visual_pos.shape[-1] != self.config.visual_pos_dim:
            raise ValueError(
                f"visual_feats {tuple(visual_feats.shape)} / visual_pos {tuple(visual_pos.shape)}: expected last dims "
                f"{self.config.visual_feat_dim} / {self.config.visual_pos_dim}"
            )
        if token_type_ids is None:
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            token_type_ids = torch.zeros(shape_bt, dtype=torch.long, device=device)
        rows_m = None
        if language_rows is not None:
            if output_hidden_states or output_attentions:
                raise ValueError("language_rows cannot be combined with output_hidden_states / output_attentions")
            batch, length = shape_bt
            cls_rows_b = torch.arange(batch, device=language_rows.device) * length
            rows_m = torch.cat([cls_rows_b, language_rows])  # the [CLS] rows first, for the pooler
        lang_btd = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        enc = self.encoder(
            lang_btd, _keep_mask(attention_mask), visual_feats, visual_pos, _keep_mask(visual_attention_mask),
            output_attentions=output_attentions, lang_rows_m=rows_m,
        )
        lang_out, vis_out = enc["language_hidden_states"][-1], enc["vision_hidden_states"][-1]
        if rows_m is None:
            pooled = self.pooler(lang_out)
        else:
            batch = shape_bt[0]
            pooled, lang_out = self.pooler.pool(lang_out[:batch]), lang_out[batch:]
        out = LxmertModelOutput(
            language_output=lang_out,
            vision_output=vis_out,
            pooled_output=pooled,
            language_hidden_states=enc["language_hidden_states"] if output_hidden_states else None,
            vision_hidden_states=enc["vision_hidden_states"] if output_hidden_states else None,
            language_attentions=enc["language_attentions"],
            vision_attentions=enc["vision_attentions"],
            cross_encoder_attentions=enc["cross_encoder_attentions"],
        )
        if return_dict:
            return out
        extra: tuple = ()
        if output_hidden_states:
            extra += (out.language_hidden_states, out.vision_hidden_states)
        if output_attentions:
            extra += (out.language_attentions, out.vision_attentions, out.cross_encoder_attentions)
        return (out.language_output, out.vision_output, out.pooled_output) + extra


class LxmertEncoder(nn.Module):
    """Visual feature encoder, then l_layers language layers, r_layers vision layers, x_layers cross layers.

    Activation checkpointing (`activation_checkpointing = True`, set through
    `LxmertPreTrainedModel.set_activation_checkpointing`): while training with gradients on, each
    language, vision and cross layer runs inside `torch.utils.checkpoint.checkpoint(use_reentrant=False)`:
    its forward keeps only the layer's inputs, and backward runs the layer's forward again to rebuild
    what it needs. Why torch's non-reentrant checkpoint rather than DeepSpeed's
    (`deepspeed.checkpointing.checkpoint`):

    * torch.compile(fullgraph=True) captures it (Dynamo turns it into the `tag_activation_checkpoint`
      higher-order op; AOTAutograd's partitioner then recomputes the region in the backward graph),
      where DeepSpeed's reentrant autograd.Function with its global RNG tracker breaks the graph;
    * it replays dropout exactly: it saves the CPU generator's state and that of the device of the
      layer's inputs before the forward and restores them for the recomputation, so `F.dropout` draws
      the same masks and the Triton kernels' seeds (`torch.randint` on the device, drawn inside the
      layer) come out equal, so the kernels regenerate the same Philox masks; the global RNG after
      backward is as without checkpointing;
    * ZeRO-3 gathers parameters in forward pre-hooks on every submodule; the recomputation calls the
      submodules' forwards again, so the hooks gather what it needs, with no DeepSpeed configuration
      (DeepSpeed's `activation_checkpointing` config section only serves its own checkpoint function
      and is not used);
    * the layers take None masks, booleans and index tensors, and return None for unrequested
      attention probabilities: the non-reentrant form takes any inputs and outputs.
    """

    def __init__(self, config: LxmertConfig, ctx: ModelContext):
        super().__init__()
        self.visn_fc = LxmertVisualFeatureEncoder(config)
        self.layer = nn.ModuleList([LxmertLayer(config, ctx) for _ in range(config.l_layers)])
        self.x_layers = nn.ModuleList([LxmertXLayer(config, ctx) for _ in range(config.x_layers)])
        self.r_layers = nn.ModuleList([LxmertLayer(config, ctx) for _ in range(config.r_layers)])
        self.activation_checkpointing = False

    def _layer(self, layer: nn.Module, *args):
        """``layer(*args)``, inside a non-reentrant activation checkpoint when it is on and gradients flow."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=True)
        return layer(*args)

    def forward(self, lang_btd, lang_mask_bt, visual_feats_bnf, visual_pos_bnp, vis_mask_bn,
                output_attentions: bool = False, lang_rows_m: Optional[Tensor] = None) -> dict[str, Any]:
        """``lang_rows_m``: the last cross layer computes the language output at these flat rows
        only (its entry in ``language_hidden_states`` is then ``(M, d)``)."""
        if lang_rows_m is not None and not len(self.x_layers):
            raise ValueError("language rows need a cross-modality layer to restrict (x_layers=0)")
        vis_bnd = self.visn_fc(visual_feats_bnf, visual_pos_bnp)
        # each mask prepared once for every attention over its keys (see attention.KeyMask)
        lang_mask_bt, vis_mask_bn = key_mask(lang_mask_bt), key_mask(vis_mask_bn)
        lang_states, vis_states = [], []
        lang_atts: Optional[list] = [] if output_attentions else None
        vis_atts: Optional[list] = [] if output_attentions else None
        cross_atts: Optional[list] = [] if output_attentions else None
        for layer in self.layer:
            lang_btd, probs = self._layer(layer, lang_btd, lang_mask_bt, output_attentions)
            lang_states.append(lang_btd)
            if output_attentions:
                lang_atts.append(probs)
        for layer in self.r_layers:
            vis_bnd, probs = self._layer(layer, vis_bnd, vis_mask_bn, output_attentions)
            vis_states.append(vis_bnd)
            if output_attentions:
                vis_atts.append(probs)
        joint_mask_bs = PairKeyMask.of(lang_mask_bt, vis_mask_bn, lang_btd.shape[1], vis_bnd.shape[1])
        last = len(self.x_layers) - 1
        for i, layer in enumerate(self.x_layers):
            lang_btd, vis_bnd, probs = self._layer(layer, lang_btd, lang_mask_bt, vis_bnd, vis_mask_bn, joint_mask_bs,
                                                   output_attentions, lang_rows_m if i == last else None)
            lang_states.append(lang_btd)
            vis_states.append(vis_bnd)
            if output_attentions:
                cross_atts.append(probs)
        as_tuple = (lambda xs: tuple(xs) if xs is not None else None)
        return {
            "language_hidden_states": tuple(lang_states),
            "vision_hidden_states": tuple(vis_states),
            "language_attentions": as_tuple(lang_atts),
            "vision_attentions": as_tuple(vis_atts),
            "cross_encoder_attentions": as_tuple(cross_atts),
        }


class LxmertPooler(nn.Module):
    """tanh(W h_[CLS] + b)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, lang_btd: Tensor) -> Tensor:
        return self.pool(lang_btd[:, 0])

    def pool(self, cls_bd: Tensor) -> Tensor:
        """The pooled output from the [CLS] states ``(B, d)``."""
        return torch.tanh(self.dense(cls_bd))


class LxmertForPreTraining(LxmertPreTrainedModel):
    """LXMERT with the five pre-training heads and their summed loss."""

    hf_architecture = "LxmertForPreTraining"

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        self.lxmert = LxmertModel(config, init_weights=False)
        self.cls = LxmertPreTrainingHeads(config)
        if config.task_obj_predict:
            self.obj_predict_head = LxmertVisualObjHead(config)
        if config.task_qa:
            self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        self.init_weights()

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        visual_feats: Optional[Tensor] = None,
        visual_pos: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        visual_attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        obj_labels: Optional[dict[str, tuple[Tensor, Tensor]]] = None,
        matched_label: Optional[Tensor] = None,
        ans: Optional[Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        output_prediction_logits: Optional[bool] = None,
        row_budget: Optional[RowBudget] = None,
    ) -> Union[LxmertForPreTrainingOutput, tuple]:
        """HF's forward. Ours in addition:

        `output_prediction_logits`: compute the (B, T, vocab) MLM logits. Default: yes, except
        when training with `labels`, where the decoder runs only at the masked positions (the loss
        is the same) and `prediction_logits` is None.
        `row_budget` (see `lxmert_fast.model.rows`): static room for the masked words and objects
        the heads read while training, so that every tensor's shape depends on the batch's shape
        only (`torch.compile(fullgraph=True)`, CUDA graphs, no host sync). A batch with more masked
        rows fails loudly. None: exactly the masked rows in eager mode (content-sized), room for
        every row inside `torch.compile`.
        """
        cfg = self.config
        want_mlm_loss = labels is not None and cfg.task_mask_lm
        if output_prediction_logits is None:
            output_prediction_logits = not (want_mlm_loss and self.training)
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if row_budget is None and torch.compiler.is_compiling():
            row_budget = RowBudget.full(batch, length, visual_feats.shape[1])
        # Without logits, hidden states or attentions to return, the heads read [CLS] and the masked
        # words only: the last cross layer's language side runs at those rows (language_output None).
        rows_m = labels_m = None
        if not (output_prediction_logits or output_hidden_states or output_attentions):
            if want_mlm_loss:
                labels_n = labels.reshape(-1)
                rows_m, valid_m = select_rows(labels_n >= 0, None if row_budget is None else row_budget.words,
                                              "masked words (labels >= 0)")
                labels_m = labels_n.index_select(0, rows_m)
                if valid_m is not None:
                    labels_m = labels_m.masked_fill(~valid_m, -100)
            else:
                rows_m = torch.zeros(0, dtype=torch.long, device=visual_feats.device)
        base = self.lxmert(
            input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos, attention_mask=attention_mask,
            visual_attention_mask=visual_attention_mask, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
            language_rows=rows_m,
        )
        lang_btd, vis_bnd, pooled_bd = base.language_output, base.vision_output, base.pooled_output
        word_emb_vd = self.lxmert.embeddings.word_embeddings.weight

        losses: dict[str, Tensor] = {}
        prediction_logits = None
        if output_prediction_logits:
            prediction_logits = self.cls.predictions(lang_btd, word_emb_vd)
            if want_mlm_loss:
                losses["mlm"] = masked_mean_cross_entropy(prediction_logits.reshape(-1, cfg.vocab_size),
                                                          labels.reshape(-1))
        elif want_mlm_loss:  # decode the masked positions only
            if rows_m is None:  # every row was computed (hidden states or attentions are returned)
                labels_n = labels.reshape(-1)
                picked_k, valid_k = select_rows(labels_n >= 0, None if row_budget is None else row_budget.words,
                                                "masked words (labels >= 0)")
                hidden_kd = lang_btd.reshape(-1, lang_btd.shape[-1]).index_select(0, picked_k)
                labels_k = labels_n.index_select(0, picked_k)
                if valid_k is not None:
                    labels_k = labels_k.masked_fill(~valid_k, -100)
            else:  # lang_btd holds the masked rows rows_m: (M, d); unused slots carry label -100
                hidden_kd, labels_k = lang_btd, labels_m
            losses["mlm"] = masked_mean_cross_entropy(self.cls.predictions(hidden_kd, word_emb_vd), labels_k)

        cross_relationship_score = self.cls.seq_relationship(pooled_bd)
        if matched_label is not None and cfg.task_matched:
            losses["matched"] = masked_mean_cross_entropy(cross_relationship_score.reshape(-1, 2),
                                                          matched_label.reshape(-1))
        if obj_labels is not None and cfg.task_obj_predict:
            if self.training:  # the masked-only outputs at the masked objects (the same losses)
                losses.update(visual_losses_at_masked_objects(
                    cfg, self.obj_predict_head, vis_bnd, obj_labels,
                    None if row_budget is None else row_budget.objects))
            else:  # every object's scores, e.g. for a forward hook reading the head's predictions
                losses.update(visual_losses(cfg, self.obj_predict_head(vis_bnd), obj_labels))
        answer_score = self.answer_head(pooled_bd) if cfg.task_qa else None
        if ans is not None and cfg.task_qa:
            losses["qa"] = masked_mean_cross_entropy(answer_score.reshape(-1, cfg.num_qa_labels), ans.reshape(-1))

        any_labels = labels is not None or matched_label is not None or obj_labels is not None or ans is not None
        total = None
        if any_labels:
            total = torch.zeros((), dtype=pooled_bd.dtype, device=pooled_bd.device)
            for value in losses.values():
                total = total + value
        out = LxmertForPreTrainingOutput(
            loss=total, prediction_logits=prediction_logits, cross_relationship_score=cross_relationship_score,
            question_answering_score=answer_score, language_output=lang_btd if rows_m is None else None,
            vision_output=vis_bnd,
            pooled_output=pooled_bd, language_hidden_states=base.language_hidden_states,
            vision_hidden_states=base.vision_hidden_states, language_attentions=base.language_attentions,
            vision_attentions=base.vision_attentions, cross_encoder_attentions=base.cross_encoder_attentions,
            losses=losses,
        )
        if return_dict:
            return out
        head = (prediction_logits, cross_relationship_score, answer_score)
        rest = tuple(x for x in (base.language_hidden_states, base.vision_hidden_states, base.language_attentions,
                                 base.vision_attentions, base.cross_encoder_attentions) if x is not None)
        return ((total,) if total is not None else ()) + head + rest


class LxmertForQuestionAnswering(LxmertPreTrainedModel):
    """LXMERT + the QA head (num_qa_labels answers); cross-entropy loss on `labels` as HF.

    Fine-tuning recipes with other losses (VQA's soft-score BCE) use `question_answering_score`.
    """

    hf_architecture = "LxmertForQuestionAnswering"

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        self.lxmert = LxmertModel(config, init_weights=False)
        self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        self.init_weights()

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        visual_feats: Optional[Tensor] = None,
        visual_pos: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        visual_attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> Union[LxmertForQuestionAnsweringOutput, tuple]:
        base = self.lxmert(
            input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos, attention_mask=attention_mask,
            visual_attention_mask=visual_attention_mask, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        score = self.answer_head(base.pooled_output)
        loss = None
        if labels is not None:
            loss = masked_mean_cross_entropy(score.reshape(-1, self.config.num_qa_labels), labels.reshape(-1))
        out = LxmertForQuestionAnsweringOutput(
            loss=loss, question_answering_score=score, language_output=base.language_output,
            vision_output=base.vision_output, pooled_output=base.pooled_output,
            language_hidden_states=base.language_hidden_states, vision_hidden_states=base.vision_hidden_states,
            language_attentions=base.language_attentions, vision_attentions=base.vision_attentions,
            cross_encoder_attentions=base.cross_encoder_attentions,
        )
        if return_dict:
            return out
        rest = tuple(x for x in (base.language_hidden_states, base.vision_hidden_states, base.language_attentions,
                                 base.vision_attentions, base.cross_encoder_attentions) if x is not None)
        return ((loss,) if loss is not None else ()) + (score,) + rest
