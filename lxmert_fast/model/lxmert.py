"""LxmertModel, LxmertForPreTraining and LxmertForQuestionAnswering: transformers' `PreTrainedModel`s.

Drop-ins for transformers' classes: the same base class (so `from_pretrained` / `save_pretrained`
with every keyword, `resize_token_embeddings`, `Trainer`, PEFT,
`push_to_hub` work as they do there), the same forward arguments, transformers' output classes,
the same maths (HF's eager attention is the `eager` backend), and checkpoints in HF's layout:
`from_pretrained` fuses HF's q/k/v and object decoders into our parameters and `save_pretrained`
splits them again (transformers' weight conversions, see lxmert_fast/checkpoints/layouts.py). Built for speed inside:
packed QKV projections, both cross-attention directions from one projection, the MLM decoder only
at masked positions while training, one fused decoder for the object heads. Nothing of
transformers' machinery runs per step: a forward is the model's own ops only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as hf_init

from lxmert_fast.config import ConfigError, LxmertConfig
from lxmert_fast.model.attention import AttentionDispatcher, PairKeyMask, key_mask
from lxmert_fast.checkpoints.layouts import (
    detect_layout,
    infer_config,
    original_to_hf,
    read_checkpoint,
    weight_conversions,
)
from lxmert_fast.model.fused_ops import make_ops
from lxmert_fast.model.heads import (
    LxmertLMPredictionHead,
    LxmertPreTrainingHeads,
    LxmertVisualAnswerHead,
    LxmertVisualObjHead,
    TiedDecoder,
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


def _lxmert_config(config) -> LxmertConfig:
    """Ours as given; transformers' LxmertConfig (or another LXMERT PretrainedConfig) as ours, with our defaults."""
    if isinstance(config, LxmertConfig):
        return config
    if getattr(config, "model_type", None) != LxmertConfig.model_type or not hasattr(config, "to_dict"):
        raise ConfigError(f"{type(config).__name__}: expected an LXMERT config (model_type 'lxmert'), got model_type "
                          f"{getattr(config, 'model_type', None)!r}")
    return LxmertConfig.from_dict(config.to_dict())


def _is_local_path(path: str) -> bool:
    """A path meant as a local file or directory: it exists, or it is absolute / explicitly relative."""
    return os.path.exists(path) or os.path.isabs(path) or path.startswith(("./", "../", "~"))


class LxmertPreTrainedModel(PreTrainedModel):
    """transformers' base class with LXMERT's init, our backend switches and checkpoint layouts."""

    config_class = LxmertConfig
    base_model_prefix = "lxmert"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    # transformers' LXMERT refuses `gradient_checkpointing_enable` ("does not support activation checkpointing"),
    # and so do we: its common test of the switch wants a gradient in every parameter, which LXMERT's heads do not
    # get from a loss on some of its tasks. Our switch is `set_activation_checkpointing` (`--activation_checkpointing`).
    supports_gradient_checkpointing = False
    # transformers' Trainer: our loss is a mean over the batch's labels and takes no `num_items_in_batch`
    accepts_loss_kwargs = False
    # a buffer older transformers versions saved
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)embeddings\.position_ids$"]

    def __init__(self, config, *inputs, **kwargs):
        config = _lxmert_config(config)
        config.check()
        super().__init__(config, *inputs, **kwargs)

    # ----------------------------------------------------------------- init
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init (normal(0, initializer_range) for Linear and Embedding, zero biases and padding
        rows, LayerNorm (1, 0)) and the MLM bias at zero, through `transformers.initialization` (which leaves
        weights that were loaded alone).

        Under ZeRO-3 (`deepspeed.zero.Init`) the parameters are already partitioned when this runs: each
        module's own parameters are gathered, initialised on rank 0 and re-partitioned.
        """
        own = list(module.parameters(recurse=False))
        if any(hasattr(p, "ds_id") for p in own):
            import deepspeed  # heavy, and only reachable when DeepSpeed partitioned the parameters (ZeRO-3)

            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                self._init_module(module)
        else:
            self._init_module(module)

    def _init_module(self, module: nn.Module) -> None:
        if isinstance(module, TiedDecoder) and self.config.tie_word_embeddings:
            return  # its weight is the word embeddings' (tied after the init)
        super()._init_weights(module)
        if isinstance(module, LxmertLMPredictionHead):
            hf_init.zeros_(module.bias)

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

    def set_activation_checkpointing(self, enabled: bool = True, use_reentrant: bool = False) -> None:
        """Recompute every encoder layer (language, vision, cross) in backward instead of keeping its
        activations, with torch's checkpoint (non-reentrant by default: see `LxmertEncoder`). The same loss and
        gradients, the same dropout masks; about one more forward's work per step. Not saved in the config.
        ``use_reentrant=True`` gives the same gradients and breaks a compiled graph."""
        self._set_gradient_checkpointing(enabled, functools.partial(checkpoint, use_reentrant=use_reentrant))

    # ----------------------------------------------------------------- checkpoints
    # `_weight_conversions` and `_load_pretrained_model` are transformers' own hooks (private names, the same
    # in 5.17 and 5.25; tests/test_checkpoints.py loads and saves through them both ways).
    @property
    def _weight_conversions(self) -> list:
        """What transformers' `save_pretrained` reverses: always our layout -> HF's (so every save is an HF
        checkpoint, whether the model was built, loaded from HF's layout or from ours)."""
        return weight_conversions()

    @_weight_conversions.setter
    def _weight_conversions(self, value: list) -> None:
        pass  # transformers records the conversions a load used; ours are fixed (above)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        """transformers' loader with our conversions first: HF's query/key/value and object decoders are
        fused into our parameters as they are read (checkpoints in our own layout pass through)."""
        if isinstance(model, LxmertPreTrainedModel):
            load_config = dataclasses.replace(
                load_config, weight_mapping=weight_conversions() + list(load_config.weight_mapping or []))
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args,
                                                      **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained` (a Hub id or an HF directory, in HF's layout or ours, with all its
        keywords), and in addition a local checkpoint file or a directory without config.json: the original
        release's `Epoch20_LXRT.pth` (its config inferred from the weights' shapes; keywords that are config
        fields override it), a `pytorch_model.bin` / `model.safetensors`, a DeepSpeed model-states file.
        Such files are read with `torch.load(weights_only=True)`; an unreadable one is a CheckpointError."""
        path = pretrained_model_name_or_path
        if path is None:
            return super().from_pretrained(path, *model_args, **kwargs)
        path = os.fspath(path)
        if not _is_local_path(path) or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))):
            return super().from_pretrained(path, *model_args, **kwargs)
        raw, config_path = read_checkpoint(path)
        state = original_to_hf(raw) if detect_layout(raw) == "original" else raw
        config = kwargs.pop("config", None)
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in LxmertConfig.__dataclass_fields__
                     or isinstance(getattr(LxmertConfig, k, None), property)}
        if config is None and config_path is not None:
            config = LxmertConfig.from_json(config_path)
        if config is None:
            config = infer_config(state, **overrides)
        elif overrides:
            config = _lxmert_config(config).replace(**overrides)
        return super().from_pretrained(None, *model_args, config=config, state_dict=state, **kwargs)

    # ----------------------------------------------------------------- the QA head (HF's methods)
    def get_qa_logit_layer(self) -> Optional[nn.Linear]:
        """The Linear that gives the answer scores (None without a QA head)."""
        head = getattr(self, "answer_head", None)
        return None if head is None else head.logit_fc[-1]

    def resize_num_qa_labels(self, num_labels: Optional[int]) -> Optional[nn.Linear]:
        """A QA output layer of `num_labels` rows: the first rows keep their weights, new rows are initialised
        (transformers' behaviour). Updates `config.num_qa_labels`. Returns the layer (None without a head)."""
        old = self.get_qa_logit_layer()
        if num_labels is None or old is None:
            return old
        if old.out_features != num_labels:
            new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            self._init_weights(new)
            keep = min(old.out_features, num_labels)
            with torch.no_grad():
                new.weight[:keep] = old.weight[:keep]
                if old.bias is not None:
                    new.bias[:keep] = old.bias[:keep]
            self.answer_head.logit_fc[-1] = new
        self.config.num_qa_labels = num_labels
        self.num_qa_labels = num_labels
        return self.get_qa_logit_layer()


class LxmertModel(LxmertPreTrainedModel):
    """The LXMERT encoders and pooler. Returns language/vision sequences and the pooled output."""

    def __init__(self, config: LxmertConfig, init_weights: bool = True):
        """``init_weights=False``: leave the weights as the layers were built; the models with heads build
        their encoder so and initialise every module in one pass, in module order (one seed gives the weights
        it gave before these models were transformers' classes)."""
        super().__init__(config)
        config = self.config
        self._context = ModelContext(AttentionDispatcher(config.attention_backend), make_ops(config.kernels))
        self.embeddings = LxmertEmbeddings(config)
        self.encoder = LxmertEncoder(config, self._context)
        self.pooler = LxmertPooler(config)
        if init_weights:
            self.post_init()

    @property
    def context(self) -> ModelContext:
        return self._context

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        visual_feats: Optional[Tensor] = None,
        visual_pos: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        visual_attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        language_rows: Optional[Tensor] = None,
    ) -> Union[LxmertModelOutput, tuple]:
        """HF's forward (output_attentions / output_hidden_states / return_dict default to the config's).

        ``language_rows`` (ours; ``(M,)`` flat indices ``b * T + t``, any order, repeats allowed): the
        last cross layer computes the language output at those rows and at the [CLS] rows only, for
        heads that read a few positions (the pre-training loss reads the masked words and [CLS]).
        ``language_output`` is then ``(M, d)`` in the order given; the pooled output is exact. Not with
        ``output_hidden_states`` / ``output_attentions``.
        """
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, d)")
        if visual_feats is None or visual_pos is None:
            raise ValueError("visual_feats (B, N, visual_feat_dim) and visual_pos (B, N, visual_pos_dim) are required")
        shape_bt = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if visual_feats.shape[-1] != cfg.visual_feat_dim or visual_pos.shape[-1] != cfg.visual_pos_dim:
            raise ValueError(
                f"visual_feats {tuple(visual_feats.shape)} / visual_pos {tuple(visual_pos.shape)}: expected last dims "
                f"{cfg.visual_feat_dim} / {cfg.visual_pos_dim}"
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
        hidden = (enc["language_hidden_states"], enc["vision_hidden_states"]) if output_hidden_states else (None, None)
        attentions = (enc["language_attentions"], enc["vision_attentions"], enc["cross_encoder_attentions"])
        if not return_dict:
            return (lang_out, vis_out, pooled) + (hidden if output_hidden_states else ()) \
                + (attentions if output_attentions else ())
        return LxmertModelOutput(
            language_output=lang_out, vision_output=vis_out, pooled_output=pooled,
            language_hidden_states=hidden[0], vision_hidden_states=hidden[1],
            language_attentions=attentions[0], vision_attentions=attentions[1], cross_encoder_attentions=attentions[2],
        )


class LxmertEncoder(nn.Module):
    """Visual feature encoder, then l_layers language layers, r_layers vision layers, x_layers cross layers.

    Activation checkpointing (`set_activation_checkpointing`; transformers' `gradient_checkpointing_enable`
    refuses LXMERT, ours as theirs): each language, vision and cross layer is a transformers
    `GradientCheckpointingLayer`; while training with gradients on, it runs inside the model's checkpoint
    function, by default torch's `torch.utils.checkpoint.checkpoint(use_reentrant=False)`: its forward
    keeps only the layer's inputs, and backward runs the layer's forward again to rebuild what it needs.
    Why torch's non-reentrant checkpoint (rather than DeepSpeed's `deepspeed.checkpointing.checkpoint`,
    or the reentrant form, which works but breaks the compiled graph):

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
            lang_btd, probs = layer(lang_btd, lang_mask_bt, output_attentions)
            lang_states.append(lang_btd)
            if output_attentions:
                lang_atts.append(probs)
        for layer in self.r_layers:
            vis_bnd, probs = layer(vis_bnd, vis_mask_bn, output_attentions)
            vis_states.append(vis_bnd)
            if output_attentions:
                vis_atts.append(probs)
        joint_mask_bs = PairKeyMask.of(lang_mask_bt, vis_mask_bn, lang_btd.shape[1], vis_bnd.shape[1])
        last = len(self.x_layers) - 1
        for i, layer in enumerate(self.x_layers):
            lang_btd, vis_bnd, probs = layer(lang_btd, lang_mask_bt, vis_bnd, vis_mask_bn, joint_mask_bs,
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


def _masked_lm_labels(labels: Optional[Tensor], masked_lm_labels: Optional[Tensor]) -> Optional[Tensor]:
    """transformers 4's deprecated spelling of `labels` (its tests still pass it)."""
    if masked_lm_labels is None:
        return labels
    if labels is not None:
        raise ValueError("pass labels or masked_lm_labels (its deprecated name), not both")
    warnings.warn("masked_lm_labels is deprecated: use labels", FutureWarning, stacklevel=3)
    return masked_lm_labels


def _sum_losses(losses: dict[str, Tensor], like: Tensor) -> Tensor:
    """The total loss: the tasks' losses summed in order onto a zero of ``like``'s dtype and device."""
    total = torch.zeros((), dtype=like.dtype, device=like.device)
    for value in losses.values():
        total = total + value
    return total


def _pretraining_output(return_dict: bool, total: Optional[Tensor], losses: Optional[dict[str, Tensor]],
                        prediction_logits: Optional[Tensor], cross_relationship_score: Tensor,
                        answer_score: Optional[Tensor],
                        base: LxmertModelOutput) -> Union[LxmertForPreTrainingOutput, tuple]:
    """The pre-training output as transformers returns it: the output class, or (with ``return_dict=False``)
    the tuple of its fields that are set (the loss first when there is one; the heads' scores always)."""
    if not return_dict:
        rest = tuple(x for x in (base.language_hidden_states, base.vision_hidden_states, base.language_attentions,
                                 base.vision_attentions, base.cross_encoder_attentions) if x is not None)
        head = (prediction_logits, cross_relationship_score, answer_score)
        return ((total,) if total is not None else ()) + head + rest
    return LxmertForPreTrainingOutput(
        loss=total, prediction_logits=prediction_logits, cross_relationship_score=cross_relationship_score,
        question_answering_score=answer_score, language_hidden_states=base.language_hidden_states,
        vision_hidden_states=base.vision_hidden_states, language_attentions=base.language_attentions,
        vision_attentions=base.vision_attentions, cross_encoder_attentions=base.cross_encoder_attentions,
        losses=losses,
    )


class LxmertForPreTraining(LxmertPreTrainedModel):
    """LXMERT with the five pre-training heads and their summed loss."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "lxmert.embeddings.word_embeddings.weight"}

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        config = self.config
        self.num_qa_labels = config.num_qa_labels
        self.lxmert = LxmertModel(config, init_weights=False)
        self.cls = LxmertPreTrainingHeads(config)
        if config.task_obj_predict:
            self.obj_predict_head = LxmertVisualObjHead(config)
        if config.task_qa:
            self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        self.post_init()

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' resize of the (tied) word embeddings, and of the MLM bias (new entries zero)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        bias = self.cls.predictions.bias
        size = embeddings.weight.shape[0]
        if bias.shape[0] != size:
            new = torch.zeros(size, dtype=bias.dtype, device=bias.device)
            keep = min(size, bias.shape[0])
            new[:keep] = bias.detach()[:keep]
            self.cls.predictions.bias = nn.Parameter(new)
        return embeddings

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
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        output_prediction_logits: Optional[bool] = None,
        row_budget: Optional[RowBudget] = None,
        masked_lm_labels: Optional[Tensor] = None,
    ) -> Union[LxmertForPreTrainingOutput, tuple]:
        """HF's forward (output_attentions / output_hidden_states / return_dict default to the config's).
        Ours in addition:

        `output_prediction_logits`: compute the (B, T, vocab) MLM logits. Default: yes, except
        when training with `labels`, where the decoder runs only at the masked positions (the loss
        is the same) and `prediction_logits` is None.
        `row_budget` (see `lxmert_fast.model.rows`): static room for the masked words and objects
        the heads read while training, so that every tensor's shape depends on the batch's shape
        only (`torch.compile(fullgraph=True)`, CUDA graphs, no host sync). A batch with more masked
        rows fails loudly. None: exactly the masked rows in eager mode (content-sized), room for
        every row inside `torch.compile`.
        The output's `losses` (after transformers' fields) holds each task's loss.
        """
        cfg = self.config
        labels = _masked_lm_labels(labels, masked_lm_labels)
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        want_mlm_loss = labels is not None and cfg.task_mask_lm
        if output_prediction_logits is None:
            output_prediction_logits = not (want_mlm_loss and self.training)
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if row_budget is None and torch.compiler.is_compiling():
            row_budget = RowBudget.full(batch, length, visual_feats.shape[1])
        # Without logits the MLM loss decodes the masked words only (selected once); without hidden states or
        # attentions either, the heads read [CLS] and those rows only: the last cross layer runs at them.
        rows_m = labels_m = language_rows = None
        if want_mlm_loss and not output_prediction_logits:
            rows_m, labels_m = self._masked_words(labels, row_budget)
        if not (output_prediction_logits or output_hidden_states or output_attentions):
            language_rows = rows_m if rows_m is not None else torch.zeros(0, dtype=torch.long,
                                                                          device=visual_feats.device)
        base = self.lxmert(
            input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos, attention_mask=attention_mask,
            visual_attention_mask=visual_attention_mask, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
            language_rows=language_rows,
        )
        lang_btd, vis_bnd, pooled_bd = base.language_output, base.vision_output, base.pooled_output

        losses: dict[str, Tensor] = {}
        prediction_logits = self.cls.predictions(lang_btd) if output_prediction_logits else None
        if want_mlm_loss:
            losses["mlm"] = self._mlm_loss(prediction_logits, lang_btd, labels, rows_m, labels_m,
                                           ran_at_rows=language_rows is not None)
        cross_relationship_score = self.cls.seq_relationship(pooled_bd)
        if matched_label is not None and cfg.task_matched:
            losses["matched"] = masked_mean_cross_entropy(cross_relationship_score.reshape(-1, 2),
                                                          matched_label.reshape(-1))
        if obj_labels is not None and cfg.task_obj_predict:
            losses.update(self._object_losses(vis_bnd, obj_labels, row_budget))
        answer_score = self.answer_head(pooled_bd) if cfg.task_qa else None
        if ans is not None and cfg.task_qa:
            losses["qa"] = masked_mean_cross_entropy(answer_score.reshape(-1, cfg.num_qa_labels), ans.reshape(-1))

        any_labels = labels is not None or matched_label is not None or obj_labels is not None or ans is not None
        total = _sum_losses(losses, like=pooled_bd) if any_labels else None
        return _pretraining_output(return_dict, total, losses if any_labels else None, prediction_logits,
                                   cross_relationship_score, answer_score, base)

    def _mlm_loss(self, prediction_logits: Optional[Tensor], lang_btd: Tensor, labels: Tensor,
                  rows_m: Optional[Tensor], labels_m: Optional[Tensor], ran_at_rows: bool) -> Tensor:
        """The masked-LM loss: from the (B, T, vocab) logits when they were computed, else decoding the
        masked rows only (``lang_btd`` holds the rows ``rows_m``, (M, d), when ``ran_at_rows``; else every
        row; unused budget slots carry label -100)."""
        if prediction_logits is not None:
            return masked_mean_cross_entropy(prediction_logits.reshape(-1, self.config.vocab_size),
                                             labels.reshape(-1))
        hidden_md = lang_btd if ran_at_rows else lang_btd.reshape(-1, lang_btd.shape[-1]).index_select(0, rows_m)
        return masked_mean_cross_entropy(self.cls.predictions(hidden_md), labels_m)

    @staticmethod
    def _masked_words(labels: Tensor, row_budget: Optional[RowBudget]) -> tuple[Tensor, Tensor]:
        """(rows_m, labels_m): the masked words' rows of the flattened (B*T) positions and their labels;
        with a budget, (budget,) of them with label -100 in the unused slots."""
        labels_n = labels.reshape(-1)
        rows_m, valid_m = select_rows(labels_n >= 0, None if row_budget is None else row_budget.words,
                                      "masked words (labels >= 0)")
        labels_m = labels_n.index_select(0, rows_m)
        if valid_m is not None:
            labels_m = labels_m.masked_fill(~valid_m, -100)
        return rows_m, labels_m

    def _object_losses(self, vis_bnd: Tensor, obj_labels: dict[str, tuple[Tensor, Tensor]],
                       row_budget: Optional[RowBudget]) -> dict[str, Tensor]:
        """The visual losses (obj / attr / feat, as the config asks)."""
        cfg = self.config
        if self.training:  # the masked-only outputs at the masked objects (the same losses)
            return visual_losses_at_masked_objects(cfg, self.obj_predict_head, vis_bnd, obj_labels,
                                                   None if row_budget is None else row_budget.objects)
        # every object's scores, e.g. for a forward hook reading the head's predictions
        return visual_losses(cfg, self.obj_predict_head(vis_bnd), obj_labels)


class LxmertForQuestionAnswering(LxmertPreTrainedModel):
    """LXMERT + the QA head (num_qa_labels answers); cross-entropy loss on `labels` as HF.

    Fine-tuning recipes with other losses (VQA's soft-score BCE) use `question_answering_score`.
    """

    def __init__(self, config: LxmertConfig):
        super().__init__(config)
        config = self.config
        self.num_qa_labels = config.num_qa_labels
        self.lxmert = LxmertModel(config, init_weights=False)
        self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        self.post_init()

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
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[LxmertForQuestionAnsweringOutput, tuple]:
        """HF's forward (output_attentions / output_hidden_states / return_dict default to the config's)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base = self.lxmert(
            input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos, attention_mask=attention_mask,
            visual_attention_mask=visual_attention_mask, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        score = self.answer_head(base.pooled_output)
        loss = None
        if labels is not None:
            loss = masked_mean_cross_entropy(score.reshape(-1, self.config.num_qa_labels), labels.reshape(-1))
        if not return_dict:
            rest = tuple(x for x in (base.language_hidden_states, base.vision_hidden_states, base.language_attentions,
                                     base.vision_attentions, base.cross_encoder_attentions) if x is not None)
            return ((loss,) if loss is not None else ()) + (score,) + rest
        return LxmertForQuestionAnsweringOutput(
            loss=loss, question_answering_score=score, language_hidden_states=base.language_hidden_states,
            vision_hidden_states=base.vision_hidden_states, language_attentions=base.language_attentions,
            vision_attentions=base.vision_attentions, cross_encoder_attentions=base.cross_encoder_attentions,
        )
