"""Attention backends behind one interface, and the registry that picks one per call.

Layout: every backend takes and returns flash-attn's (batch, seq, heads, head_dim) layout,
written `_blhd`, so that q, k and v can be strided views of one packed projection
(`qkv_bl3hd[:, :, 0]` ...) without copies. Masks are boolean `key_padding_mask_bl`
(batch, keys), True = keep, or the same prepared once as a `KeyMask` (a `PairKeyMask` for the
cross pair): the model prepares each mask once per forward and every attention over the same
keys shares it. A query whose keys are all masked gets a zero output (never NaN) from every
backend.

A backend answers `not_supported_reasons(call)` with a list of reasons it cannot serve a call
(empty = it can). `auto` takes the first backend of `AUTO_ORDER` with no reasons; a named
backend that cannot serve a call raises `AttentionBackendError` listing why, never falls back.

Three entry points:
- `attention(q, k, v, mask, ...)`: one attention (one cross direction; a rows-only query set).
- `attention_qkv(qkv, mask, ...)`: self-attention of one packed (B, L, 3, H, D) projection; the
  default unbinds it into `attention`, the Triton backend takes it whole (one dqkv in backward).
- `cross_pair(qkv, n_lang, mask, ...)`: LXMERT's bidirectional cross-attention from ONE packed
  projection of the concatenated [lang; vision] tokens: language queries attend to vision
  keys/values and vision queries attend to language keys/values. The default is two
  `attention` calls; a backend may do both directions in one launch (the Triton one does).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot serve this call (the message lists why)."""


@dataclass(frozen=True)
class AttentionCall:
    """What a call needs, for `not_supported_reasons` (hashable: used as a cache key)."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    dropout: bool
    need_weights: bool
    auto: bool = False

    @classmethod
    def of(cls, q_blhd: Tensor, dropout_p: float, need_weights: bool, auto: bool = False) -> "AttentionCall":
        return cls(q_blhd.device.type, q_blhd.dtype, q_blhd.shape[-1], dropout_p > 0.0, need_weights, auto)

    def key(self) -> tuple:
        return (self.device_type, self.dtype, self.head_dim, self.dropout, self.need_weights, self.auto)


class KeyMask(NamedTuple):
    """A boolean key-padding mask with what the backends derive from it, computed once (per
    forward) and shared by every attention over the same keys; eager mode would otherwise derive
    it again in each of LXMERT's ~30 attention calls (about 5 small launches each).

    keep_bl:    (B, L) bool, True = keep: the mask itself (the Triton kernels and flash-attn's input).
    attend_bl:  (B, L) bool: keep_bl, except that a row with no kept key attends to every key
                (SDPA's boolean mask: no NaN for it; its output is zeroed after).
    empty_b111: (B, 1, 1, 1) bool: True where no key is kept (those queries' outputs are zero).
    """

    keep_bl: Tensor
    attend_bl: Tensor
    empty_b111: Tensor

    @classmethod
    def of(cls, keep_bl: Tensor) -> "KeyMask":
        if keep_bl.dtype != torch.bool or keep_bl.dim() != 2:
            raise TypeError(f"a key-padding mask must be a (batch, keys) bool tensor (True = keep), got "
                            f"{keep_bl.dtype} of shape {tuple(keep_bl.shape)}")
        empty_b = ~keep_bl.any(dim=-1)
        return cls(keep_bl, keep_bl | empty_b[:, None], empty_b[:, None, None, None])

    def rows(self, b_m: Tensor) -> "KeyMask":
        """The mask of batch rows ``b_m`` (M,), e.g. one per query of a rows-only layer."""
        return KeyMask(self.keep_bl.index_select(0, b_m), self.attend_bl.index_select(0, b_m),
                       self.empty_b111.index_select(0, b_m))


class PairKeyMask(NamedTuple):
    """The cross pair's masks, prepared once per forward: keep_bs (B, S) bool over the joint
    [lang; vision] keys (for a backend that runs both directions in one call), and each
    segment's `KeyMask` (None: every key of that segment kept) for one call per direction."""

    keep_bs: Tensor
    lang: Optional[KeyMask]
    vis: Optional[KeyMask]

    @classmethod
    def of(cls, lang: Optional[KeyMask], vis: Optional[KeyMask], n_lang: int, n_vis: int) -> Optional["PairKeyMask"]:
        """None when neither segment has a mask."""
        if lang is None and vis is None:
            return None
        like = (lang if lang is not None else vis).keep_bl
        ones = (lambda n: torch.ones(like.shape[0], n, dtype=torch.bool, device=like.device))
        keep_bs = torch.cat([lang.keep_bl if lang is not None else ones(n_lang),
                             vis.keep_bl if vis is not None else ones(n_vis)], dim=1)
        return cls(keep_bs, lang, vis)


MaskArg = Union[KeyMask, Tensor, None]


def key_mask(mask: MaskArg) -> Optional[KeyMask]:
    """A backend's mask argument as a `KeyMask` (a bare bool tensor is prepared here, per call)."""
    if mask is None or isinstance(mask, KeyMask):
        return mask
    return KeyMask.of(mask)


def pair_key_mask(mask: Union[PairKeyMask, Tensor, None], n_lang: int) -> Optional[PairKeyMask]:
    """The cross pair's mask argument as a `PairKeyMask` (a bare (B, S) bool tensor over
    [lang; vision] is split at ``n_lang`` and prepared here, per call)."""
    if mask is None or isinstance(mask, PairKeyMask):
        return mask
    return PairKeyMask(mask, KeyMask.of(mask[:, :n_lang]), KeyMask.of(mask[:, n_lang:]))


def import_optional(module: str, missing: str):
    """(the module, None), or (None, "<missing>: <the ImportError>") when it does not import: a backend built
    on an optional package gives that reason from `not_supported_reasons` instead of failing to construct."""
    try:
        return importlib.import_module(module), None
    except ImportError as err:
        return None, f"{missing}: {err}"


class AttentionBackend:
    """Base class. Subclasses implement `attention` and `not_supported_reasons`.

    A backend holds no per-model state (at most the modules it imported), so copies of a model
    share it: ``copy.deepcopy`` returns the backend itself."""

    name = "base"

    def __deepcopy__(self, memo: dict) -> "AttentionBackend":
        return self

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def attention(
        self,
        q_blhd: Tensor,
        k_blhd: Tensor,
        v_blhd: Tensor,
        key_padding_mask_bl: MaskArg,
        dropout_p: float,
        scale: float,
        need_weights: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:  # pragma: no cover - interface
        """Returns (out_blhd, probs_bhqk or None)."""
        raise NotImplementedError

    def attention_qkv(
        self,
        qkv_bl3hd: Tensor,
        key_padding_mask_bl: MaskArg,
        dropout_p: float,
        scale: float,
        need_weights: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Self-attention of one packed (B, L, 3, H, D) projection; by default `attention` on its views (a
        backend may take the packed tensor whole, e.g. to write one gradient for the projection)."""
        q_blhd, k_blhd, v_blhd = qkv_bl3hd.unbind(dim=2)
        return self.attention(q_blhd, k_blhd, v_blhd, key_padding_mask_bl, dropout_p, scale, need_weights)

    def cross_pair(
        self,
        qkv_bl3hd: Tensor,
        n_lang: int,
        key_padding_mask_bl: Union[PairKeyMask, Tensor, None],
        dropout_p: float,
        scale: float,
        need_weights: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Both cross directions; returns (out_blhd over [lang; vision], lang->vision probs or None).
        ``key_padding_mask_bl``: a `PairKeyMask`, or a (B, S) bool mask over [lang; vision]."""
        q, k, v = qkv_bl3hd.unbind(dim=2)
        pair = pair_key_mask(key_padding_mask_bl, n_lang)
        lang_mask, vis_mask = (None, None) if pair is None else (pair.lang, pair.vis)
        lang_out, lang_probs = self.attention(
            q[:, :n_lang], k[:, n_lang:], v[:, n_lang:], vis_mask, dropout_p, scale, need_weights
        )
        vis_out, _ = self.attention(q[:, n_lang:], k[:, :n_lang], v[:, :n_lang], lang_mask, dropout_p, scale, False)
        return torch.cat([lang_out, vis_out], dim=1), lang_probs


class EagerAttention(AttentionBackend):
    """The reference maths, line for line as LXMERT/HF compute it: the parity oracle.

    scores = q k^T / sqrt(d) + (1 - mask) * finfo.min; softmax; dropout; @ v. Rows whose keys
    are all masked are zeroed (HF would return the mean of the values there).
    """

    name = "eager"

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return []

    def attention(self, q_blhd, k_blhd, v_blhd, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        q_bhld = q_blhd.transpose(1, 2)
        k_bhld = k_blhd.transpose(1, 2)
        v_bhld = v_blhd.transpose(1, 2)
        scores_bhqk = torch.matmul(q_bhld, k_bhld.transpose(-1, -2))
        head_dim = q_blhd.shape[-1]
        if scale == 1.0 / math.sqrt(head_dim):
            scores_bhqk = scores_bhqk / math.sqrt(head_dim)
        else:
            scores_bhqk = scores_bhqk * scale
        mask = key_mask(key_padding_mask_bl)
        if mask is not None:
            additive_b11k = (1.0 - mask.keep_bl[:, None, None, :].to(scores_bhqk.dtype)) * torch.finfo(
                scores_bhqk.dtype
            ).min
            scores_bhqk = scores_bhqk + additive_b11k
        probs_bhqk = torch.softmax(scores_bhqk, dim=-1)
        if mask is not None:
            probs_bhqk = probs_bhqk.masked_fill(mask.empty_b111, 0.0)
        dropped_bhqk = F.dropout(probs_bhqk, p=dropout_p, training=dropout_p > 0.0)
        out_bhld = torch.matmul(dropped_bhqk, v_bhld)
        return out_bhld.transpose(1, 2), (probs_bhqk if need_weights else None)


class SdpaAttention(AttentionBackend):
    """torch.nn.functional.scaled_dot_product_attention (PyTorch picks its own kernel)."""

    name = "sdpa"

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        if call.need_weights:
            reasons.append("sdpa cannot return attention probabilities (output_attentions=True)")
        if not hasattr(F, "scaled_dot_product_attention"):
            reasons.append("this torch has no scaled_dot_product_attention")
        return reasons

    def attention(self, q_blhd, k_blhd, v_blhd, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        if need_weights:
            raise AttentionBackendError("sdpa cannot return attention probabilities")
        mask = key_mask(key_padding_mask_bl)
        # A row with no kept key would give NaN: it attends everywhere (attend_bl), then is zeroed.
        mask_b11k = None if mask is None else mask.attend_bl[:, None, None, :]
        out_bhld = F.scaled_dot_product_attention(
            q_blhd.transpose(1, 2),
            k_blhd.transpose(1, 2),
            v_blhd.transpose(1, 2),
            attn_mask=mask_b11k,
            dropout_p=dropout_p,
            scale=scale,
        )
        out_blhd = out_bhld.transpose(1, 2)
        if mask is not None:
            out_blhd = out_blhd.masked_fill(mask.empty_b111, 0.0)
        return out_blhd, None


class UnavailableBackend(AttentionBackend):
    """Stands in for a registered backend whose module could not be imported; says why."""

    def __init__(self, name: str, why: str):
        self.name = name
        self._why = why

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return [self._why]

    def attention(self, *args, **kwargs):
        raise AttentionBackendError(f"attention backend {self.name!r} is unavailable: {self._why}")

    cross_pair = attention_qkv = attention


# name -> zero-argument factory. Optional backends live in their own modules and are imported
# only when first asked for, so importing lxmert_fast never imports triton or flash_attn.
_BACKEND_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {
    "eager": EagerAttention,
    "sdpa": SdpaAttention,
}
_LAZY_BACKENDS: dict[str, str] = {
    "triton": "lxmert_fast.model.triton_backend:TritonAttention",
    "flash_attn": "lxmert_fast.model.flash_attn_backend:FlashAttnAttention",
}
AUTO_ORDER = ("flash_attn", "triton", "sdpa", "eager")


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    """Add (or replace) a backend; `factory()` builds it on first use."""
    if name == "auto":
        raise ValueError("'auto' is reserved for automatic selection")
    _BACKEND_FACTORIES[name] = factory


def available_backend_names() -> list[str]:
    return sorted(set(_BACKEND_FACTORIES) | set(_LAZY_BACKENDS) | {"auto"})


def _build_backend(name: str) -> AttentionBackend:
    if name in _BACKEND_FACTORIES:
        return _BACKEND_FACTORIES[name]()
    if name in _LAZY_BACKENDS:
        module_name, _, attr = _LAZY_BACKENDS[name].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            return UnavailableBackend(name, f"cannot import {module_name}: {err}")
        return getattr(module, attr)()
    raise AttentionBackendError(
        f"unknown attention backend {name!r}: expected one of {available_backend_names()}"
    )


class AttentionDispatcher:
    """Resolves the configured backend name to a backend for each kind of call (cached).

    One dispatcher is shared by every layer of a model; `set_backend` switches them all.
    """

    def __init__(self, name: str = "auto"):
        self._backends: dict[str, AttentionBackend] = {}
        self._resolved: dict[tuple, AttentionBackend] = {}
        self.name = "auto"
        self._bind_backend_name_for()
        self.set_backend(name)

    def _bind_backend_name_for(self) -> None:
        """``self._backend_name_for(name, call_key)``: the name of the backend this dispatcher
        (configured as ``name``) picks for a call, which torch.compile calls while tracing and
        takes as a constant (see `resolve`).

        The mark is what `torch._dynamo.assume_constant_result` sets, without importing
        torch._dynamo here (it takes seconds, and importing it inside DeepSpeed's zero.Init, where
        ZeRO-3 builds the model, fails). The function closes over the dispatcher because the
        compiled code may pass it constants only (torch 2.11 refuses an object argument; 2.13
        accepts one). Checked by the compile tests: one graph, no recompilation."""
        def backend_name_for(name: str, call_key: tuple) -> str:
            return self._resolve_cached(AttentionCall(*call_key)).name

        backend_name_for._dynamo_marked_constant = True
        self._backend_name_for = backend_name_for

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_backend_name_for"]  # a closure over this dispatcher: a copy binds its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bind_backend_name_for()

    def set_backend(self, name: str) -> None:
        if name != "auto":
            self._get(name)  # unknown names fail here, not at the first forward
        self.name = name
        self._resolved.clear()

    def _get(self, name: str) -> AttentionBackend:
        if name not in self._backends:
            self._backends[name] = _build_backend(name)
        return self._backends[name]

    def resolve(self, call: AttentionCall) -> AttentionBackend:
        if torch.compiler.is_compiling():
            # Resolved once while tracing, as a constant: the choice depends only on the call's static
            # properties and the configured name (which the compiled code guards on), and tracing the
            # cache would make its first fill a guard failure (a recompile on the second call).
            return self._backends[self._backend_name_for(self.name, call.key())]
        return self._resolve_cached(call)

    def _resolve_cached(self, call: AttentionCall) -> AttentionBackend:
        key = call.key()
        backend = self._resolved.get(key)
        if backend is not None:
            return backend
        if self.name == "auto":
            auto_call = AttentionCall(call.device_type, call.dtype, call.head_dim, call.dropout, call.need_weights, True)
            report = []
            for name in AUTO_ORDER:
                candidate = self._get(name)
                reasons = candidate.not_supported_reasons(auto_call)
                if not reasons:
                    backend = candidate
                    break
                report.append(f"  {name}: " + "; ".join(reasons))
            if backend is None:
                raise AttentionBackendError("no attention backend can serve this call:\n" + "\n".join(report))
        else:
            backend = self._get(self.name)
            reasons = backend.not_supported_reasons(call)
            if reasons:
                raise AttentionBackendError(
                    f"attention backend {self.name!r} cannot serve this call "
                    f"({call.device_type}, {call.dtype}, head_dim={call.head_dim}, dropout={call.dropout}, "
                    f"need_weights={call.need_weights}): " + "; ".join(reasons)
                )
        self._resolved[key] = backend
        return backend

    def attention(self, q_blhd, k_blhd, v_blhd, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        backend = self.resolve(AttentionCall.of(q_blhd, dropout_p, need_weights))
        return backend.attention(q_blhd, k_blhd, v_blhd, key_padding_mask_bl, dropout_p, scale, need_weights)

    def attention_qkv(self, qkv_bl3hd, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        backend = self.resolve(AttentionCall.of(qkv_bl3hd[:, :, 0], dropout_p, need_weights))
        return backend.attention_qkv(qkv_bl3hd, key_padding_mask_bl, dropout_p, scale, need_weights)

    def cross_pair(self, qkv_bl3hd, n_lang, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        backend = self.resolve(AttentionCall.of(qkv_bl3hd[:, :, 0], dropout_p, need_weights))
        return backend.cross_pair(qkv_bl3hd, n_lang, key_padding_mask_bl, dropout_p, scale, need_weights)

    def current(self, q_blhd: Tensor, dropout_p: float = 0.0, need_weights: bool = False) -> str:
        """The name of the backend that would serve such a call (for logs and benchmarks)."""
        return self.resolve(AttentionCall.of(q_blhd, dropout_p, need_weights)).name
