"""LxmertConfig: HuggingFace's field names and defaults, read from and written to `config.json`.

The fields up to `tie_word_embeddings` are HuggingFace's `LxmertConfig` fields with the same
defaults, so an HF `config.json` reads into this class and ours reads into transformers.
The fields after it are this project's own (attention backend, fused kernels, the object-label
loss variant); they are written into `config.json` under the key ``"lxmert_fast"``, which
transformers keeps as an opaque attribute.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

# Keys transformers writes that are derived or bookkeeping, not configuration of the model.
_HF_DERIVED_KEYS = frozenset(
    {
        "num_hidden_layers",
        "transformers_version",
        "architectures",
        "model_type",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
    }
)
_OWN_SECTION = "lxmert_fast"
SUPPORTED_ACTIVATIONS = ("gelu",)
OBJ_LABEL_LOSS_MODES = ("all", "masked")
KERNEL_CHOICES = ("torch", "triton", "apex")
# The released code multiplies each visual loss by 1 / 0.15 (lxmert_pretrain.py); transformers' configs say 6.67.
# Our pre-training recipe and configs inferred from an original checkpoint use the released value.
RELEASED_VISUAL_LOSS_NORMALIZER = 1.0 / 0.15


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


@dataclass
class LxmertConfig:
    # --- HuggingFace fields (same names and defaults as transformers.LxmertConfig) ---
    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_qa_labels: int = 9500
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    l_layers: int = 9
    x_layers: int = 5
    r_layers: int = 5
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    visual_loss_normalizer: float = 6.67
    task_matched: bool = True
    task_mask_lm: bool = True
    task_obj_predict: bool = True
    task_qa: bool = True
    visual_obj_loss: bool = True
    visual_attr_loss: bool = True
    visual_feat_loss: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = True
    # --- lxmert-fast fields ---
    # Attention backend name from lxmert_fast.model.attention (eager | sdpa | triton | flash_attn | auto).
    attention_backend: str = "auto"
    # Implementation of the residual+LayerNorm and bias+GELU ops: torch | triton | apex.
    kernels: str = "torch"
    # Object/attribute label losses on "all" objects (the released code) or only "masked" ones (the paper).
    obj_label_loss: str = "all"
    # Keys of an HF config.json we do not model; kept so that a read/write round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"LxmertConfig.{name} = {getattr(self, name)!r}: expected {expected}")

        for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "visual_feat_dim", "visual_pos_dim"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer")
        for name in ("num_qa_labels", "num_object_labels", "num_attr_labels", "l_layers", "x_layers", "r_layers"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"LxmertConfig.hidden_size = {self.hidden_size} is not divisible by "
                f"num_attention_heads = {self.num_attention_heads}: expected hidden_size to be a multiple of it"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and 0.0 <= value < 1.0, name, "a probability in [0, 1)")
        need(self.initializer_range > 0, "initializer_range", "a positive float")
        need(self.hidden_act in SUPPORTED_ACTIVATIONS, "hidden_act", f"one of {SUPPORTED_ACTIVATIONS} (exact erf GELU)")
        need(self.obj_label_loss in OBJ_LABEL_LOSS_MODES, "obj_label_loss", f"one of {OBJ_LABEL_LOSS_MODES}")
        need(self.kernels in KERNEL_CHOICES, "kernels", f"one of {KERNEL_CHOICES}")
        need(isinstance(self.attention_backend, str) and bool(self.attention_backend), "attention_backend",
             "a backend name (eager, sdpa, triton, flash_attn or auto)")
        if self.task_qa:
            need(self.num_qa_labels > 0, "num_qa_labels", "> 0 when task_qa is on")
        need(self.tie_word_embeddings is True, "tie_word_embeddings", "True (LXMERT ties the MLM decoder)")

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

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LxmertConfig":
        """`base` is LXMERT-base (the paper); `small` a laptop-sized model; `tiny` is for tests."""
        presets: dict[str, dict[str, Any]] = {
            "base": {},
            "small": dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                          l_layers=3, x_layers=2, r_layers=2),
            "tiny": dict(vocab_size=120, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         l_layers=2, x_layers=2, r_layers=1, visual_feat_dim=48, num_qa_labels=11,
                         num_object_labels=17, num_attr_labels=7, max_position_embeddings=64),
        }
        if name not in presets:
            raise ConfigError(f"unknown LxmertConfig preset {name!r}: expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    # Fields a --config_overrides string may set (as HF's run_mlm.py --config_overrides): the model's
    # shape and initialisation. Task switches, losses and kernels have their own flags.
    OVERRIDABLE = ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_dropout_prob",
                   "attention_probs_dropout_prob", "initializer_range", "l_layers", "x_layers", "r_layers",
                   "visual_loss_normalizer")

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

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def hf_field_names(cls) -> tuple[str, ...]:
        names = cls.field_names()
        return names[: names.index("tie_word_embeddings") + 1]

    @classmethod
    def own_field_names(cls) -> tuple[str, ...]:
        names = cls.field_names()
        return names[names.index("tie_word_embeddings") + 1:]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "LxmertConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "lxmert")
        if model_type != "lxmert":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'lxmert'")
        hf_fields = set(cls.hf_field_names())
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in hf_fields:
                kwargs[key] = value
            elif key == _OWN_SECTION:
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: field {_OWN_SECTION!r} must be an object")
                unknown = set(value) - set(cls.own_field_names())
                if unknown:
                    raise ConfigError(f"{source}: unknown keys in {_OWN_SECTION!r}: {sorted(unknown)}")
                kwargs.update(value)
            elif key not in _HF_DERIVED_KEYS:
                extra[key] = value
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """HF-compatible dict: HF fields at the top level, ours under "lxmert_fast"."""
        out: dict[str, Any] = dict(self.extra)
        out.update({name: getattr(self, name) for name in self.hf_field_names()})
        out["model_type"] = "lxmert"
        out[_OWN_SECTION] = {name: getattr(self, name) for name in self.own_field_names()}
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LxmertConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        return cls.from_dict(data, source=path)

    def to_json_string(self, architectures: list[str] | None = None) -> str:
        data = self.to_dict()
        if architectures:
            data["architectures"] = list(architectures)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json(self, path: str | os.PathLike, architectures: list[str] | None = None) -> None:
        from lxmert_fast.utils import atomic_write_text

        atomic_write_text(path, self.to_json_string(architectures))

    def replace(self, **changes: Any) -> "LxmertConfig":
        return dataclasses.replace(self, **changes)
