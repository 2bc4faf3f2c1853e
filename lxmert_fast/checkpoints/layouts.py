"""Checkpoint layouts: HuggingFace <-> ours <-> the original release.

transformers' `from_pretrained` / `save_pretrained` read and write our models (see
`LxmertPreTrainedModel`); what is ours is the mapping between the layouts: `weight_conversions`
(transformers' `WeightConverter`s that fuse HF's q/k/v and object decoders while loading and split
them again while saving), the readers of the original release's files and of state dicts in any of
the three layouts, and the config inferred from an original checkpoint's shapes.

Three key layouts:
- HF (`transformers.LxmertForPreTraining`): `lxmert.encoder.layer.0.attention.self.query.weight`,
  `obj_predict_head.decoder_dict.obj.weight`, `cls.predictions.decoder.weight` (tied, optional).
  HF's `LxmertModel` has the same keys without the `lxmert.` prefix.
- original (airsplay/lxmert `Epoch20_LXRT.pth`, saved from nn.DataParallel): HF's keys with
  `module.` in front and `bert.` for `lxmert.` (`module.bert.encoder.x_layers.0...`); LayerNorm
  parameters possibly named gamma/beta.
- ours: HF's keys, except query/key/value fused into one `qkv` (rows q, k, v) and the object
  head's decoders fused into `obj_predict_head.decoder` (rows obj, attr, feat).

Everything is read with `torch.load(weights_only=True)` or safetensors; keys that do not map and
shapes that do not fit raise `CheckpointError` listing them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file
from transformers.core_model_loading import Concatenate, ConversionOps, WeightConverter

from lxmert_fast.config import RELEASED_VISUAL_LOSS_NORMALIZER, ConfigError, LxmertConfig

Tensor = torch.Tensor

_QKV_HF = re.compile(r"^(?P<stem>.*\.(?:self|att))\.(?P<part>query|key|value)\.(?P<kind>weight|bias)$")
_QKV_OURS = re.compile(r"^(?P<stem>.*\.(?:self|att))\.qkv\.(?P<kind>weight|bias)$")
_OBJ_HF = re.compile(r"^(?P<stem>(?:.*\.)?obj_predict_head)\.decoder_dict\.(?P<name>obj|attr|feat)\.(?P<kind>weight|bias)$")
_OBJ_OURS = re.compile(r"^(?P<stem>(?:.*\.)?obj_predict_head)\.decoder\.(?P<kind>weight|bias)$")
_QKV_PARTS = ("query", "key", "value")
# Keys that carry no information: the tied MLM decoder and buffers older transformers saved.
_REDUNDANT_KEY = re.compile(r"(^|\.)(cls\.predictions\.decoder\.weight|embeddings\.position_ids)$")
HEAD_PREFIXES = ("cls.", "obj_predict_head.", "answer_head.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model (the message lists what and where)."""


# ---------------------------------------------------------------------------------------------- transformers' loader
class _SplitObjectDecoders(ConversionOps):
    """Saving: our fused object decoder -> HF's `decoder_dict.{obj,attr,feat}`, split by the config's sizes
    (the enabled ones, in the config's order)."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
        if len(input_dict) != 1:
            raise CheckpointError(f"the fused object decoder: expected one tensor, got {sorted(input_dict)}")
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        dims = config.visual_loss_dims()
        targets = [next(t for t in target_patterns if f".{name}." in t) for name in dims]
        return dict(zip(targets, (piece.contiguous() for piece in value.split(list(dims.values()), dim=0))))

    @property
    def reverse_op(self) -> ConversionOps:
        return _ConcatObjectDecoders(dim=0)


class _ConcatObjectDecoders(Concatenate):
    """Loading: HF's `decoder_dict.{obj,attr,feat}` -> our fused decoder (the ones the checkpoint has, in
    obj, attr, feat order); saving splits by the config's sizes."""

    @property
    def reverse_op(self) -> ConversionOps:
        return _SplitObjectDecoders()


def weight_conversions() -> list[WeightConverter]:
    """transformers' conversions between HF's checkpoint layout and our parameters: query/key/value ->
    one `qkv` (rows q, k, v) in every self- and cross-attention, the object head's three decoders -> one
    `decoder` (rows obj, attr, feat). `from_pretrained` applies them; `save_pretrained` reverses them, so
    what is saved is HF's layout. Fresh objects each call (transformers keeps state in them)."""
    out = []
    for stem in ("self", "att"):
        for kind in ("weight", "bias"):
            out.append(WeightConverter([f"{stem}.{part}.{kind}" for part in _QKV_PARTS], f"{stem}.qkv.{kind}",
                                       operations=[Concatenate(dim=0)]))
    for kind in ("weight", "bias"):
        out.append(WeightConverter([f"obj_predict_head.decoder_dict.{name}.{kind}" for name in ("obj", "attr", "feat")],
                                   f"obj_predict_head.decoder.{kind}", operations=[_ConcatObjectDecoders(dim=0)]))
    return out


# ---------------------------------------------------------------------------------------------- mapping
def hf_to_ours(hf: Mapping[str, Tensor], config: LxmertConfig) -> dict[str, Tensor]:
    """HF key names -> ours (fusing q/k/v and the object decoders). Unknown keys pass through unchanged."""
    out: dict[str, Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    obj_parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in hf.items():
        if _REDUNDANT_KEY.search(key):
            continue
        m = _QKV_HF.match(key)
        if m:
            qkv_parts.setdefault((m["stem"], m["kind"]), {})[m["part"]] = value
            continue
        m = _OBJ_HF.match(key)
        if m:
            obj_parts.setdefault((m["stem"], m["kind"]), {})[m["name"]] = value
            continue
        out[key] = value
    for (stem, kind), parts in qkv_parts.items():
        missing = [p for p in _QKV_PARTS if p not in parts]
        if missing:
            raise CheckpointError(f"{stem}: has {sorted(parts)} but lacks {missing} {kind}")
        out[f"{stem}.qkv.{kind}"] = torch.cat([parts[p] for p in _QKV_PARTS], dim=0)
    for (stem, kind), parts in obj_parts.items():
        wanted = config.visual_losses
        if sorted(parts) != sorted(wanted):
            raise CheckpointError(
                f"{stem}.decoder_dict has {sorted(parts)} {kind}s but the config enables visual losses {list(wanted)}"
            )
        out[f"{stem}.decoder.{kind}"] = torch.cat([parts[name] for name in wanted], dim=0)
    return out


def ours_to_hf(ours: Mapping[str, Tensor], config: LxmertConfig) -> dict[str, Tensor]:
    """Our key names -> HF's (splitting q/k/v and the object decoders); tensors are views, not copies."""
    out: dict[str, Tensor] = {}
    dims = config.visual_loss_dims()
    for key, value in ours.items():
        m = _QKV_OURS.match(key)
        if m:
            for part, piece in zip(_QKV_PARTS, value.chunk(3, dim=0)):
                out[f"{m['stem']}.{part}.{m['kind']}"] = piece
            continue
        m = _OBJ_OURS.match(key)
        if m:
            for name, piece in zip(dims, value.split(list(dims.values()), dim=0)):
                out[f"{m['stem']}.decoder_dict.{name}.{m['kind']}"] = piece
            continue
        out[key] = value
    return out


def original_to_hf(original: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """airsplay/lxmert key names (`module.bert.`..., gamma/beta) -> HF's."""
    out = {}
    for key, value in original.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("bert."):
            key = "lxmert." + key[len("bert."):]
        key = re.sub(r"\.gamma$", ".weight", key)
        key = re.sub(r"\.beta$", ".bias", key)
        out[key] = value
    return out


def detect_layout(state: Mapping[str, Any]) -> str:
    """'original', 'ours' or 'hf', from the key names."""
    keys = list(state)
    if any(k.startswith("module.") for k in keys) or any(k.startswith("bert.") for k in keys):
        return "original"
    if any(_QKV_OURS.match(k) for k in keys):
        return "ours"
    return "hf"


# ---------------------------------------------------------------------------------------------- reading files
def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """Accept a plain state dict, or one wrapped as {"state_dict"|"model"|"module": state_dict}."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(
        f"{source}: not a model checkpoint: expected a state dict (str -> tensor), "
        f"or one under 'state_dict', 'model' or 'module'; found {type(obj).__name__}"
    )


def read_state_dict_file(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises several error types for a bad header
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors, or an object weights_only refuses to unpickle
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint with torch.load(weights_only=True): {err}"
        ) from None
    return _unwrap(obj, path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], Optional[str]]:
    """Returns (state dict as stored, path of a config.json beside it or None)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        config_path = config_path if os.path.isfile(config_path) else None
        for name in INDEX_FILES:
            index_path = os.path.join(path, name)
            if os.path.isfile(index_path):
                with open(index_path, encoding="utf-8") as fh:
                    shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{index_path}: has no weight_map")
                state: dict[str, Tensor] = {}
                for shard in shards:
                    state.update(read_state_dict_file(os.path.join(path, shard)))
                return state, config_path
        for name in WEIGHT_FILES:
            file_path = os.path.join(path, name)
            if os.path.isfile(file_path):
                return read_state_dict_file(file_path), config_path
        raise CheckpointError(f"{path}: directory has no weights: expected one of {WEIGHT_FILES + INDEX_FILES}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or directory")
    config_path = os.path.join(os.path.dirname(path), "config.json")
    return read_state_dict_file(path), (config_path if os.path.isfile(config_path) else None)


def infer_config(state_hf: Mapping[str, Tensor], **overrides: Any) -> LxmertConfig:
    """A config from an HF-layout state dict's shapes (for the original release, which has none).

    num_attention_heads is not in the shapes: hidden_size // 64 (LXMERT's head size) unless given.
    """
    keys = {k[len("lxmert."):] if k.startswith("lxmert.") else k: v for k, v in state_hf.items()}

    def shape(key: str) -> tuple[int, ...]:
        if key not in keys:
            raise CheckpointError(f"cannot infer the config: the checkpoint has no {key!r}")
        return tuple(keys[key].shape)

    def count(prefix: str) -> int:
        found = {int(m.group(1)) for k in keys for m in [re.match(re.escape(prefix) + r"\.(\d+)\.", k)] if m}
        return max(found) + 1 if found else 0

    vocab, hidden = shape("embeddings.word_embeddings.weight")
    values: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
        visual_feat_dim=shape("encoder.visn_fc.visn_fc.weight")[1],
        visual_pos_dim=shape("encoder.visn_fc.box_fc.weight")[1],
        l_layers=count("encoder.layer"),
        x_layers=count("encoder.x_layers"),
        r_layers=count("encoder.r_layers"),
        visual_loss_normalizer=RELEASED_VISUAL_LOSS_NORMALIZER,  # no config: the released recipe's (1 / 0.15)
    )
    for layer_key in ("encoder.layer.0.intermediate.dense.weight", "encoder.r_layers.0.intermediate.dense.weight",
                      "encoder.x_layers.0.lang_inter.dense.weight"):
        if layer_key in keys:
            values["intermediate_size"] = keys[layer_key].shape[0]
            break
    values["task_qa"] = "answer_head.logit_fc.3.weight" in keys
    if values["task_qa"]:
        values["num_qa_labels"] = shape("answer_head.logit_fc.3.weight")[0]
    decoders = {name: keys.get(f"obj_predict_head.decoder_dict.{name}.weight") for name in ("obj", "attr", "feat")}
    values["task_obj_predict"] = any(v is not None for v in decoders.values())
    if values["task_obj_predict"]:
        values["visual_obj_loss"] = decoders["obj"] is not None
        values["visual_attr_loss"] = decoders["attr"] is not None
        values["visual_feat_loss"] = decoders["feat"] is not None
        if decoders["obj"] is not None:
            values["num_object_labels"] = decoders["obj"].shape[0]
        if decoders["attr"] is not None:
            values["num_attr_labels"] = decoders["attr"].shape[0]
    values.update(overrides)
    try:
        return LxmertConfig(**values)
    except ConfigError as err:
        raise CheckpointError(f"the config inferred from the checkpoint's shapes is invalid: {err}") from None




# ---------------------------------------------------------------------------------------------- state dicts
def tied_keys(model) -> set[str]:
    """The model's parameter names that are tied to another one (the MLM decoder: the word embeddings)."""
    return set(getattr(model, "all_tied_weights_keys", None) or ())


def load_state_into(model, state_ours: Mapping[str, Tensor], source: str,
                    ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Copy a state dict in our layout into `model`; every missing, unexpected or misshaped key is an error
    (tied parameters, e.g. the MLM decoder, come with what they are tied to)."""
    tied = tied_keys(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    state = {k: v for k, v in state_ours.items() if not k.startswith(ignore_prefixes) and k not in tied}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {wrong}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=False)


def hf_state_dict(model) -> dict[str, Tensor]:
    """The model's weights under HF's key names, without tied copies (what `save_pretrained` writes)."""
    tied = tied_keys(model)
    return ours_to_hf({k: v for k, v in model.state_dict().items() if k not in tied}, model.config)
