"""LxmertConfig: transformers' `LxmertConfig` with this project's fields added.

It subclasses `transformers.LxmertConfig` (a `PretrainedConfig`): every HF keyword and method
(`from_pretrained`, `save_pretrained`, `to_dict`, `num_labels`, `output_attentions`, `return_dict`,
...), the same `model_type` ("lxmert") and field defaults, so transformers' models take our config
and ours take theirs. Our fields (attention backend, fused kernels, the object-label loss variant)
are plain config fields, written into `config.json` beside HF's; transformers keeps them as
attributes when it reads such a file.

Ours in addition: validation that names the field (`ConfigError`), presets (`preset`), `replace`,
and the `--config_overrides` parser (`parse_overrides`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import transformers
from huggingface_hub.dataclasses import strict

SUPPORTED_ACTIVATIONS = ("gelu",)
OBJ_LABEL_LOSS_MODES = ("all", "masked")
KERNEL_CHOICES = ("torch", "triton", "apex")
# The released code multiplies each visual loss by 1 / 0.15 (lxmert_pretrain.py); transformers' configs say 6.67.
# Our pre-training recipe and configs inferred from an original checkpoint use the released value.
RELEASED_VISUAL_LOSS_NORMALIZER = 1.0 / 0.15
# config.json files written by lxmert-fast before it built on PretrainedConfig kept our fields under this key.
_LEGACY_SECTION = "lxmert_fast"
OWN_FIELDS = ("attention_backend", "kernels", "obj_label_loss")

PRESETS: dict[str, dict[str, Any]] = {
    "base": {},  # LXMERT-base, the paper's
    "small": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, l_layers=3, x_layers=2, r_layers=2),
    "tiny": dict(vocab_size=120, hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=2, x_layers=2,
                 r_layers=1, visual_feat_dim=48, num_qa_labels=11, num_object_labels=17, num_attr_labels=7,
                 max_position_embeddings=64),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


@strict
class LxmertConfig(transformers.LxmertConfig):
    # Attention backend name from lxmert_fast.model.attention (eager | sdpa | triton | flash_attn | auto).
    attention_backend: str = "auto"
    # Implementation of the residual+LayerNorm and bias+GELU ops: torch | triton | apex.
    kernels: str = "torch"
    # Object/attribute label losses on "all" objects (the released code) or only "masked" ones (the paper).
    obj_label_loss: str = "all"

    # Fields a --config_overrides string may set (as HF's run_mlm.py --config_overrides): the model's
    # shape and initialisation. Task switches, losses and kernels have their own flags.
    OVERRIDABLE = ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_dropout_prob",
                   "attention_probs_dropout_prob", "initializer_range", "l_layers", "x_layers", "r_layers",
                   "visual_loss_normalizer")

    def __post_init__(self, **kwargs):
        legacy = kwargs.pop(_LEGACY_SECTION, None)
        if legacy is not None:
            if not isinstance(legacy, dict) or set(legacy) - set(OWN_FIELDS):
                raise ConfigError(f"LxmertConfig.{_LEGACY_SECTION} = {legacy!r}: expected an object with keys "
                                  f"among {OWN_FIELDS}")
            for name, value in legacy.items():
                setattr(self, name, value)
        super().__post_init__(**kwargs)
        self.check(model=False)

    def validate_lxmert_fast(self) -> None:
        """`@strict`'s class validator (run by `config.validate()`, e.g. after fields were set one by one)."""
        self.check(model=False)

    # ------------------------------------------------------------------ validation
    def check(self, model: bool = True) -> None:
        """Raise ConfigError naming the first field whose value the model cannot use.

        Each field's own range is checked when the config is made; with ``model`` also how fields fit
        together (hidden_size a multiple of num_attention_heads), which, as in transformers, a config may
        violate until a model is built from it (`preset`, `replace` and the models check it).
        """

        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"LxmertConfig.{name} = {getattr(self, name)!r}: expected {expected}")

        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "visual_feat_dim", "visual_pos_dim"):
            need(getattr(self, name) > 0, name, "a positive integer")
        for name in ("num_qa_labels", "num_object_labels", "num_attr_labels", "l_layers", "x_layers", "r_layers"):
            need(getattr(self, name) >= 0, name, "an integer >= 0")
        if model and self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"LxmertConfig.hidden_size = {self.hidden_size} is not divisible by "
                f"num_attention_heads = {self.num_attention_heads}: expected hidden_size to be a multiple of it"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            need(0.0 <= getattr(self, name) < 1.0, name, "a probability in [0, 1)")
        need(self.initializer_range > 0, "initializer_range", "a positive float")
        need(self.hidden_act in SUPPORTED_ACTIVATIONS, "hidden_act", f"one of {SUPPORTED_ACTIVATIONS} (exact erf GELU)")
        need(self.obj_label_loss in OBJ_LABEL_LOSS_MODES, "obj_label_loss", f"one of {OBJ_LABEL_LOSS_MODES}")
        need(self.kernels in KERNEL_CHOICES, "kernels", f"one of {KERNEL_CHOICES}")
        need(bool(self.attention_backend), "attention_backend", "a backend name (eager, sdpa, triton, flash_attn or auto)")
        if self.task_qa:
            need(self.num_qa_labels > 0, "num_qa_labels", "> 0 when task_qa is on")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def visual_losses(self) -> tuple[str, ...]:
        """The enabled visual losses, in the order of the fused object-head decoder: obj, attr, feat."""
        switches = (("obj", self.visual_obj_loss), ("attr", self.visual_attr_loss), ("feat", self.visual_feat_loss))
        return tuple(name for name, on in switches if on)

    @property
    def pretraining_losses(self) -> tuple[str, ...]:
        """The losses `LxmertForPreTraining` computes with this config, in its order: mlm, matched, the visual
        losses, qa (the keys of its output's `losses`)."""
        visual = self.visual_losses if self.task_obj_predict else ()
        return (("mlm",) if self.task_mask_lm else ()) + (("matched",) if self.task_matched else ()) + visual \
            + (("qa",) if self.task_qa else ())

    @property
    def masked_visual_losses(self) -> tuple[str, ...]:
        """The enabled visual losses that weigh masked objects only (feat; obj and attr too with
        obj_label_loss="masked"): always the last rows of the fused decoder."""
        masked = {"feat"} | ({"obj", "attr"} if self.obj_label_loss == "masked" else set())
        return tuple(name for name in self.visual_losses if name in masked)

    def visual_loss_dims(self) -> dict[str, int]:
        dims = {"obj": self.num_object_labels, "attr": self.num_attr_labels, "feat": self.visual_feat_dim}
        return {name: dims[name] for name in self.visual_losses}

    # ------------------------------------------------------------------ field names
    @classmethod
    def hf_field_names(cls) -> tuple[str, ...]:
        """transformers.LxmertConfig's own fields (not PretrainedConfig's common ones), in its order."""
        common = {f.name for f in dataclasses.fields(transformers.PretrainedConfig)}
        return tuple(f.name for f in dataclasses.fields(transformers.LxmertConfig) if f.name not in common)

    @classmethod
    def own_field_names(cls) -> tuple[str, ...]:
        return OWN_FIELDS

    # ------------------------------------------------------------------ presets, copies, overrides
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LxmertConfig":
        """`base` is LXMERT-base (the paper); `small` a laptop-sized model; `tiny` is for tests."""
        if name not in PRESETS:
            raise ConfigError(f"unknown LxmertConfig preset {name!r}: expected one of {sorted(PRESETS)}")
        cls._check_names(overrides, f"LxmertConfig.preset({name!r})")
        config = cls(**{**PRESETS[name], **overrides})
        config.check()
        return config

    def replace(self, **changes: Any) -> "LxmertConfig":
        """A copy with these fields changed, checked again."""
        self._check_names(changes, "LxmertConfig.replace")
        out = copy.deepcopy(self)
        for name, value in changes.items():
            setattr(out, name, value)
        out.check()
        return out

    @classmethod
    def _check_names(cls, values: dict[str, Any], where: str) -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known and not isinstance(getattr(cls, k, None), property))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}")

    @classmethod
    def parse_overrides(cls, text: str) -> dict[str, Any]:
        """``"hidden_size=128,initializer_range=0.05"`` -> ``{"hidden_size": 128, "initializer_range": 0.05}``.

        Each value is converted to the field's type; an unknown or non-overridable field, a missing
        ``=`` or a value of the wrong type is a :class:`ConfigError` naming the item.
        """
        out: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not raw:
                raise ConfigError(f"config override {item!r}: expected field=value")
            if key not in cls.OVERRIDABLE:
                raise ConfigError(f"config override {item!r}: {key!r} cannot be overridden; expected one of "
                                  f"{', '.join(cls.OVERRIDABLE)}")
            kind = int if types[key] in (int, "int") else float
            try:
                out[key] = kind(raw)
            except ValueError:
                raise ConfigError(f"config override {item!r}: expected {'an integer' if kind is int else 'a number'}"
                                  ) from None
        return out

    # ------------------------------------------------------------------ reading a file, with errors that name it
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LxmertConfig":
        """`from_pretrained` of a local config.json (or of the directory holding one), where a missing or
        unreadable file, or one of another model type, is a ConfigError naming the file."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: no such config file")
        try:
            data = cls.get_config_dict(file)[0]
        except OSError as err:  # transformers' message for a file that is not JSON
            raise ConfigError(f"{file}: not valid JSON ({err})") from None
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"{file}: model_type is {model_type!r}, expected {cls.model_type!r}")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{file}: {err}") from None
