"""The kernels against their PyTorch peers at LXMERT's shapes, forward and forward + backward.

Groups (one row per implementation, ``x_ours`` = its time over ours' in the group):
- the cross pair (20 words + 36 objects, both directions): ``bidirectional_cross_attention`` (one launch)
  against two SDPA calls with their slicing and concatenation;
- self-attention over 20 padded words and over 36 objects: ``flash_attention_qkv`` against SDPA (its
  automatic choice, and each backend forced on a GPU);
- dropout + residual + LayerNorm (768) and bias + GELU (3072): ours against torch and against a copy of
  the same bytes (``copy``: how close to the memory's speed the kernel comes).
Dropout 0 and 0.1 for the attention and LayerNorm backward. On a GPU: bf16, `triton.testing.do_bench`;
on a CPU: the Triton interpreter at 2 heads, fp32, one timed call (a smoke test of the part, not a figure).
Our kernels launch with the heuristics table, as training does.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.common import append_row, short_error, time_kernel

LANG, VIS = 20, 36


def _sdpa(q_blhd, k_blhd, v_blhd, keep_bl: Optional[torch.Tensor], p: float):
    mask = None if keep_bl is None else keep_bl[:, None, None, :]
    out = F.scaled_dot_product_attention(q_blhd.transpose(1, 2), k_blhd.transpose(1, 2), v_blhd.transpose(1, 2),
                                         attn_mask=mask, dropout_p=p)
    return out.transpose(1, 2)


def _timed(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """The call to time: the forward alone (no autograd) or forward + backward of a fixed upstream gradient."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
        return run
    grad = torch.randn_like(forward())

    def run():
        return torch.autograd.grad(forward(), inputs, grad)
    return run


class Groups:
    """Builds the inputs of each group and times its contenders; every row goes to ``emit`` as measured."""

    def __init__(self, emit: Callable[[dict], None], dry: bool, rounds: int):
        import lxmert_kernels  # the kernels package: CUDA, or the interpreter switched on before this import

        self.lk, self.emit, self.rounds = lxmert_kernels, emit, rounds
        self.cuda = torch.cuda.is_available() and not dry
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.heads, self.head_dim, self.hidden, self.ffn = (12, 64, 768, 3072) if self.cuda else (2, 16, 64, 128)
        self.gen = torch.Generator().manual_seed(0)

    def rand(self, *shape, grad=True) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device, self.dtype).requires_grad_(grad)

    def measure(self, group: dict, contenders: dict[str, Callable[[], object]], ours: str) -> None:
        rows = []
        for impl, fn in contenders.items():
            row = dict(group, part="kernels", impl=impl, key=f"kernels:{group['op']} B{group['batch']} {group['mode']}")
            try:
                row.update(ms=time_kernel(fn, self.rounds), status="ok")
            except Exception as err:  # noqa: BLE001  (a backend that cannot take the call is a result too)
                row.update(ms=None, status=f"no figure (error): {short_error(err)}")
            rows.append(row)
        base = next((r["ms"] for r in rows if r["impl"] == ours and r["ms"]), None)
        for row in rows:
            row["x_ours"] = row["ms"] / base if base and row["ms"] else None
            self.emit(row)

    def sdpa_backends(self) -> dict[str, Callable]:
        if not self.cuda:
            return {}
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return {name: (lambda b=getattr(SDPBackend, attr): sdpa_kernel(b))
                for name, attr in (("efficient", "EFFICIENT_ATTENTION"), ("flash", "FLASH_ATTENTION"),
                                   ("cudnn", "CUDNN_ATTENTION")) if hasattr(SDPBackend, attr)}

    def forced(self, ctx, fn):
        def run():
            with ctx():
                return fn()
        return run

    def cross_pair(self, batch: int, mode: str, p: float) -> None:
        n = LANG + VIS
        qkv = self.rand(batch, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        keep = torch.ones(batch, n, dtype=torch.bool)
        keep[:, :LANG] = torch.arange(LANG)[None] < torch.randint(6, LANG + 1, (batch, 1), generator=self.gen)
        keep = keep.to(self.device)

        def two_sdpa():
            lang = _sdpa(q[:, :LANG], k[:, LANG:], v[:, LANG:], None, p)
            vis = _sdpa(q[:, LANG:], k[:, :LANG], v[:, :LANG], keep[:, :LANG], p)
            return torch.cat([lang, vis], 1)

        c = {"ours": _timed(lambda: self.lk.bidirectional_cross_attention(qkv, LANG, keep, dropout_p=p), [qkv], mode),
             "2 x sdpa": _timed(two_sdpa, [qkv], mode)}
        c.update({f"2 x sdpa {name}": self.forced(ctx, c["2 x sdpa"]) for name, ctx in self.sdpa_backends().items()})
        self.measure({"op": "cross_pair", "batch": batch, "mode": mode, "dropout": p}, c, "ours")

    def self_attention(self, batch: int, length: int, mode: str, p: float) -> None:
        qkv = self.rand(batch, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        keep = None
        if length == LANG:  # padded words
            keep = (torch.arange(LANG)[None] < torch.randint(6, LANG + 1, (batch, 1), generator=self.gen))
            keep = keep.to(self.device)
        c = {"ours": _timed(lambda: self.lk.flash_attention_qkv(qkv, keep, dropout_p=p), [qkv], mode),
             "sdpa": _timed(lambda: _sdpa(q, k, v, keep, p), [qkv], mode)}
        c.update({f"sdpa {name}": self.forced(ctx, c["sdpa"]) for name, ctx in self.sdpa_backends().items()})
        self.measure({"op": f"self_attention L{length}", "batch": batch, "mode": mode, "dropout": p}, c, "ours")

    def copy_of(self, nbytes: int) -> Callable[[], object]:
        src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    def layer_norm(self, batch: int, mode: str, p: float) -> None:
        rows = batch * (LANG + VIS)
        x, r = self.rand(rows, self.hidden), self.rand(rows, self.hidden)
        w = torch.ones(self.hidden, device=self.device, dtype=self.dtype, requires_grad=True)
        b = torch.zeros(self.hidden, device=self.device, dtype=self.dtype, requires_grad=True)

        def torch_ln():
            return F.layer_norm((F.dropout(x, p) if p else x) + r, (self.hidden,), w, b, 1e-12)

        nbytes = rows * self.hidden * x.element_size() * (3 if mode == "fwd" else 8)  # x, r, y (+ dy, dx, dr ...)
        c = {"ours": _timed(lambda: self.lk.layer_norm(x, w, b, 1e-12, r, dropout_p=p), [x, r, w, b], mode),
             "torch": _timed(torch_ln, [x, r, w, b], mode), "copy": self.copy_of(nbytes)}
        self.measure({"op": "layer_norm+residual", "batch": batch, "mode": mode, "dropout": p, "bytes": nbytes},
                     c, "ours")

    def bias_gelu(self, batch: int, mode: str) -> None:
        rows = batch * (LANG + VIS)
        x, b = self.rand(rows, self.ffn), self.rand(self.ffn)
        nbytes = rows * self.ffn * x.element_size() * (2 if mode == "fwd" else 5)
        c = {"ours": _timed(lambda: self.lk.bias_gelu(x, b), [x, b], mode),
             "torch": _timed(lambda: F.gelu(x + b), [x, b], mode), "copy": self.copy_of(nbytes)}
        self.measure({"op": "bias_gelu", "batch": batch, "mode": mode, "dropout": 0.0, "bytes": nbytes}, c, "ours")


def run(batches: list[int], emit: Callable[[dict], None], dry: bool) -> None:
    """Every group at every batch, the cross pair first (the headline), then self-attention, then LayerNorm
    and GELU."""
    g = Groups(emit, dry, rounds=1 if dry else 30)
    dropouts = (0.0, 0.1) if g.cuda else (0.0,)
    for batch in batches:
        for mode in ("fwd", "fwd+bwd"):
            for p in dropouts if mode == "fwd+bwd" else (0.0,):
                g.cross_pair(batch, mode, p)
                g.self_attention(batch, LANG, mode, p)
                g.self_attention(batch, VIS, mode, p)
            for p in dropouts:
                g.layer_norm(batch, mode, p)
            g.bias_gelu(batch, mode)


def main(argv: list[str]) -> int:
    """``python -m bench.ops ROWS BATCHES gpu|dry``: the part alone, its rows appended to ROWS (the GPU
    plan runs it in its own process, so its memory is freed when it ends)."""
    rows_path, batches, kind = Path(argv[0]), [int(b) for b in argv[1].split(",")], argv[2]

    def emit(row: dict) -> None:
        append_row(rows_path, row)
        print(f"[kernels] {row['key']:<40} {row['impl']:<20} " + (f"{row['ms']:.4f} ms" if row.get("ms") else
                                                                    row["status"]), flush=True)

    run(batches, emit, dry=kind == "dry")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
