"""The `flash_attn` attention backend (Dao's flash-attn package, when importable).

Keys are unpadded with the key-padding mask and run through `flash_attn_varlen_func`
(queries keep their padded layout: every query position gets an output, as in the other
backends); without a mask, `flash_attn_func`. CUDA, fp16/bf16, head_dim <= 256 and a multiple of 8.
"""

from __future__ import annotations

import torch

from lxmert_fast.model.attention import AttentionBackend, AttentionBackendError, AttentionCall, import_optional, key_mask


class FlashAttnAttention(AttentionBackend):
    name = "flash_attn"

    def __init__(self) -> None:
        self._fa, self._import_error = import_optional("flash_attn", "flash-attn is not installed")

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        if self._fa is None:
            return [self._import_error]
        reasons = []
        if call.device_type != "cuda":
            reasons.append(f"{call.device_type} tensors: flash-attn runs on CUDA only")
        if call.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {call.dtype}: flash-attn takes float16 or bfloat16")
        if call.head_dim > 256 or call.head_dim % 8:
            reasons.append(f"head_dim {call.head_dim}: flash-attn needs a multiple of 8 up to 256")
        if call.need_weights:
            reasons.append("cannot return attention probabilities (output_attentions=True)")
        return reasons

    def attention(self, q_blhd, k_blhd, v_blhd, key_padding_mask_bl, dropout_p, scale, need_weights=False):
        if need_weights:
            raise AttentionBackendError("flash_attn cannot return attention probabilities")
        mask = key_mask(key_padding_mask_bl)
        if mask is None:
            return self._fa.flash_attn_func(q_blhd, k_blhd, v_blhd, dropout_p=dropout_p, softmax_scale=scale), None
        batch, len_q, heads, dim = q_blhd.shape
        len_k = k_blhd.shape[1]
        keep_n = mask.keep_bl.reshape(-1).nonzero().squeeze(1)
        lengths_b = mask.keep_bl.sum(dim=1, dtype=torch.int32)
        cu_k = torch.nn.functional.pad(lengths_b.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (batch + 1) * len_q, len_q, dtype=torch.int32, device=q_blhd.device)
        k_nhd = k_blhd.reshape(batch * len_k, heads, dim).index_select(0, keep_n)
        v_nhd = v_blhd.reshape(batch * len_k, heads, dim).index_select(0, keep_n)
        out_nhd = self._fa.flash_attn_varlen_func(
            q_blhd.reshape(batch * len_q, heads, dim), k_nhd, v_nhd, cu_q, cu_k, len_q, len_k,
            dropout_p=dropout_p, softmax_scale=scale,
        )
        out_blhd = out_nhd.view(batch, len_q, heads, dim)
        return out_blhd.masked_fill(mask.empty_b111, 0.0), None
