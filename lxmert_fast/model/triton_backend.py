"""The `triton` attention backend: lxmert_kernels' flash attention and the one-launch cross pair.

Serves CUDA tensors; CPU tensors only when named explicitly and the Triton interpreter is on
(TRITON_INTERPRET=1, for tests): `auto` never picks the interpreter.
"""

from __future__ import annotations

import importlib

from lxmert_fast.model.attention import (AttentionBackend, AttentionBackendError, AttentionCall, import_optional,
                                        key_mask, pair_key_mask)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def _keep(mask):
    """The kernels' (B, L) bool mask from a backend mask argument (the kernels handle rows with no key)."""
    mask = key_mask(mask)
    return None if mask is None else mask.keep_bl


class TritonAttention(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        self._kernels, self._import_error = import_optional("lxmert_kernels",
                                                            "cannot import lxmert_kernels (pip install ./kernels)")
        self._common = None if self._kernels is None else importlib.import_module("lxmert_kernels._common")

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        if self._kernels is None:
            return [self._import_error]
        reasons = []
        if call.device_type != "cuda":
            if call.auto:
                reasons.append(f"{call.device_type} tensors: auto uses Triton on CUDA only")
            elif not self._common.interpret_requested():
                reasons.append(f"{call.device_type} tensors need CUDA, or TRITON_INTERPRET=1 for the interpreter")
        if call.head_dim not in SUPPORTED_HEAD_DIMS:
            reasons.append(f"head_dim {call.head_dim} not in {SUPPORTED_HEAD_DIMS}")
        if call.need_weights:
            reasons.append("cannot return attention probabilities (output_attentions=True)")
        if str(call.dtype) not in ("torch.float16", "torch.bfloat16", "torch.float32"):
            reasons.append(f"dtype {call.dtype} not in float16/bfloat16/float32")
        return reasons

    def attention(self, q_blhd, k_blhd, v_blhd, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        if need_weights:
            raise AttentionBackendError("triton cannot return attention probabilities")
        out = self._kernels.flash_attention(q_blhd, k_blhd, v_blhd, key_padding_mask=_keep(key_padding_mask_bl),
                                            dropout_p=dropout_p, softmax_scale=scale)
        return out, None

    def attention_qkv(self, qkv_bl3hd, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        """Self-attention of one packed (B, L, 3, H, D) projection: `lxmert_kernels.flash_attention_qkv`,
        whose backward writes one dqkv (no stack of dq, dk, dv into the projection's gradient)."""
        if need_weights:
            raise AttentionBackendError("triton cannot return attention probabilities")
        out = self._kernels.flash_attention_qkv(qkv_bl3hd, key_padding_mask=_keep(key_padding_mask_bl),
                                                dropout_p=dropout_p, softmax_scale=scale)
        return out, None

    def cross_pair(self, qkv_bl3hd, n_lang, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        if need_weights:
            raise AttentionBackendError("triton cannot return attention probabilities")
        pair = pair_key_mask(key_padding_mask_bl, n_lang)
        out = self._kernels.bidirectional_cross_attention(qkv_bl3hd, n_lang,
                                                          key_padding_mask=None if pair is None else pair.keep_bs,
                                                          dropout_p=dropout_p, softmax_scale=scale)
        return out, None
