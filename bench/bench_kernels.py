"""Kernel benchmark: lxmert_kernels against PyTorch peers at LXMERT shapes, in one process.

    python bench/bench_kernels.py --out bench/results [--quick] [--batches 32,128,512] [--no-compile]

Measured (forward, and forward + backward):
  * self-attention, 12 heads, D 64, 20 (language, padded) and 36 (vision) tokens:
    ``flash_attention`` vs torch SDPA with each backend (math / efficient / flash / cudnn, forced
    with ``torch.nn.attention.sdpa_kernel``), and flash-attn when it is installed;
  * the cross-attention pair (20 lang + 36 vision from one packed projection):
    ``bidirectional_cross_attention`` (one launch) vs two SDPA calls;
  * dropout + residual + LayerNorm (768) and bias + GELU (3072) vs PyTorch eager and
    ``torch.compile``, with achieved bandwidth (GB/s, the minimal bytes each op must move).
Timing: warm-up, then CUDA events around every run, median of many runs. Each measurement is a
JSON row (hardware, torch / triton versions, git commit) written to ``--out``/bench_kernels.jsonl;
a table is printed last. ``ratio`` = peer time / ours (> 1: ours is faster).

``--quick`` runs tiny shapes; without a GPU it uses the Triton interpreter (a smoke test of the
script, not a measurement). ``run(out_dir, quick=False) -> list[dict]`` is the entry point for
bench/run.py.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import append_row, git_commit, utc_now  # noqa: E402

HEADS, HEAD_DIM, LANG, VIS, HIDDEN, FFN = 12, 64, 20, 36, 768, 3072


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------
def _import_kernels():
    """Import lxmert_kernels (installed, or from the source tree); on a machine without CUDA
    switch on the Triton interpreter first (it must be set before the kernels are imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import lxmert_kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "kernels"))
    import lxmert_kernels as lk

    return lk


def environment() -> dict:
    import triton

    if torch.cuda.is_available():
        hw = torch.cuda.get_device_name()
    else:
        hw = f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"
    return {
        "hardware": hw,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": utc_now(),
    }


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
_L2_FLUSH: dict = {}


def _flush_l2() -> None:
    """Overwrite a buffer larger than the L2 (60 MB on an H200) before each timed run, so an op whose
    inputs would fit there is timed reading them from memory, as in a training step (as do_bench)."""
    buf = _L2_FLUSH.get("buf")
    if buf is None:
        buf = _L2_FLUSH["buf"] = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    buf.zero_()


def median_ms(fn, warmup: int, reps: int) -> float:
    """Median wall time of fn() in ms: CUDA events around each run (the L2 flushed before each, outside
    the events), or a synchronised clock."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(reps):
            _flush_l2()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _step(forward, inputs, dout, mode):
    """A callable running forward (mode 'fwd') or forward + backward (mode 'fwd+bwd')."""
    if mode == "fwd":
        def f():
            with torch.no_grad():
                forward()
    else:
        def f():
            out = forward()
            torch.autograd.grad(out, inputs, dout)
    return f


# ----------------------------------------------------------------------------------------------
# contenders
# ----------------------------------------------------------------------------------------------
def _sdpa_backends():
    """name -> context manager factory forcing one SDPA backend (those this torch knows)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch
        return {}
    out = {}
    for name, attr in (("math", "MATH"), ("efficient", "EFFICIENT_ATTENTION"), ("flash", "FLASH_ATTENTION"),
                       ("cudnn", "CUDNN_ATTENTION")):
        if hasattr(SDPBackend, attr):
            out[name] = (lambda b=getattr(SDPBackend, attr): sdpa_kernel(b))
    return out


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore

        return flash_attn_func
    except Exception:  # noqa: BLE001
        return None


def _sdpa(q_blhd, k_blhd, v_blhd, mask_bl, dropout_p):
    """SDPA on (B, L, H, D) views, bool key-padding mask broadcast to (B, 1, 1, Lk)."""
    attn_mask = None if mask_bl is None else mask_bl[:, None, None, :]
    out_bhld = F.scaled_dot_product_attention(q_blhd.transpose(1, 2), k_blhd.transpose(1, 2),
                                              v_blhd.transpose(1, 2), attn_mask=attn_mask, dropout_p=dropout_p)
    return out_bhld.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# benchmark groups
# ----------------------------------------------------------------------------------------------
class Recorder:
    """Times implementations and keeps a row per measurement. on_row(row): called as soon as each row
    is measured (the GPU check appends it to its JSONL file there and then). sdpa_backends: which
    forced SDPA backends to time besides the automatic choice (None: all this torch knows)."""

    def __init__(self, env, warmup, reps, on_row=None, sdpa_backends=None):
        self.env, self.warmup, self.reps, self.rows = env, warmup, reps, []
        self.on_row = on_row
        self.sdpa_backends = sdpa_backends

    def sdpa(self):
        both = _sdpa_backends()
        return {k: v for k, v in both.items() if self.sdpa_backends is None or k in self.sdpa_backends}

    def measure(self, group: dict, impl: str, fn, work: dict | None = None, ctx=None, **extra):
        row = dict(self.env, **group, impl=impl, **extra)
        try:
            if ctx is not None:
                with ctx():
                    ms = median_ms(fn, self.warmup, self.reps)
            else:
                ms = median_ms(fn, self.warmup, self.reps)
            row["ms"] = round(ms, 5)
            if work and "bytes" in work:
                row["GB/s"] = round(work["bytes"] / (ms * 1e-3) / 1e9, 1)
            if work and "flops" in work:
                row["TFLOP/s"] = round(work["flops"] / (ms * 1e-3) / 1e12, 2)
        except Exception as e:  # noqa: BLE001  (an unsupported backend is a result too)
            row["ms"] = None
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)
        return row


def _finish_group(rows):
    """ratio = time / ours' time for every row of one group (same op, shape, mode)."""
    ours = [r for r in rows if r["impl"].startswith("ours") and r.get("ms")]
    if not ours:
        return
    t_ours = min(r["ms"] for r in ours)  # the fastest of ours (flash_attention and its packed-qkv form)
    for r in rows:
        if r.get("ms"):
            r["ratio"] = round(r["ms"] / t_ours, 3)


def bench_self_attention(lk, rec, batches, dtype, device, modes, dropouts, heads=HEADS, head_dim=HEAD_DIM):
    flash_attn_func = _flash_attn_func()
    gen = torch.Generator().manual_seed(0)
    for B in batches:
        for L, padded in ((LANG, True), (VIS, False)):
            qkv = torch.randn(B, L, 3, heads, head_dim, generator=gen).to(device, dtype).requires_grad_(True)
            q, k, v = qkv.unbind(dim=2)
            mask = None
            if padded:
                lengths = torch.randint(6, L + 1, (B,), generator=gen)
                mask = (torch.arange(L)[None] < lengths[:, None]).to(device)
            dout = torch.randn(B, L, heads, head_dim, generator=gen).to(device, dtype)
            for mode in modes:
                for p in dropouts if mode == "fwd+bwd" else (0.0,):
                    group = dict(op="self_attention", mode=mode, shape=f"B{B} L{L} H{heads} D{head_dim}",
                                 dtype=str(dtype)[6:], masked=padded, dropout=p)
                    fl = 4 * B * heads * L * L * head_dim * (3.5 if mode == "fwd+bwd" else 1.0)
                    start = len(rec.rows)
                    rec.measure(group, "ours flash_attention",
                                _step(lambda: lk.flash_attention(q, k, v, mask, dropout_p=p), [qkv], dout, mode),
                                {"flops": fl})
                    if hasattr(lk, "flash_attention_qkv"):  # the packed projection: one gradient tensor, no stack
                        rec.measure(group, "ours flash_attention_qkv",
                                    _step(lambda: lk.flash_attention_qkv(qkv, mask, dropout_p=p), [qkv], dout, mode),
                                    {"flops": fl})
                    rec.measure(group, "sdpa (auto backend)",
                                _step(lambda: _sdpa(q, k, v, mask, p), [qkv], dout, mode), {"flops": fl})
                    for name, ctx in rec.sdpa().items():
                        rec.measure(group, f"sdpa {name}",
                                    _step(lambda: _sdpa(q, k, v, mask, p), [qkv], dout, mode), {"flops": fl}, ctx)
                    if flash_attn_func is not None and mask is None:
                        rec.measure(group, "flash_attn",
                                    _step(lambda: flash_attn_func(q, k, v, dropout_p=p), [qkv], dout, mode),
                                    {"flops": fl})
                    _finish_group(rec.rows[start:])


def bench_cross_pair(lk, rec, batches, dtype, device, modes, dropouts, heads=HEADS, head_dim=HEAD_DIM):
    gen = torch.Generator().manual_seed(1)
    L = LANG + VIS
    for B in batches:
        qkv = torch.randn(B, L, 3, heads, head_dim, generator=gen).to(device, dtype).requires_grad_(True)
        q, k, v = qkv.unbind(dim=2)
        lengths = torch.randint(6, LANG + 1, (B,), generator=gen)
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[:, :LANG] = torch.arange(LANG)[None] < lengths[:, None]
        mask = mask.to(device)
        dout = torch.randn(B, L, heads, head_dim, generator=gen).to(device, dtype)

        def two_sdpa(p):
            o_lang = _sdpa(q[:, :LANG], k[:, LANG:], v[:, LANG:], None, p)  # vision keys: no padding
            o_vis = _sdpa(q[:, LANG:], k[:, :LANG], v[:, :LANG], mask[:, :LANG], p)
            return torch.cat([o_lang, o_vis], dim=1)

        for mode in modes:
            for p in dropouts if mode == "fwd+bwd" else (0.0,):
                group = dict(op="cross_pair", mode=mode, shape=f"B{B} {LANG}+{VIS} H{heads} D{head_dim}",
                             dtype=str(dtype)[6:], masked=True, dropout=p)
                fl = 2 * 4 * B * heads * LANG * VIS * head_dim * (3.5 if mode == "fwd+bwd" else 1.0)
                start = len(rec.rows)
                rec.measure(group, "ours bidirectional (1 launch)",
                            _step(lambda: lk.bidirectional_cross_attention(qkv, LANG, mask, dropout_p=p), [qkv],
                                  dout, mode), {"flops": fl})
                rec.measure(group, "2 x sdpa (auto backend)", _step(lambda: two_sdpa(p), [qkv], dout, mode),
                            {"flops": fl})
                for name, ctx in rec.sdpa().items():
                    rec.measure(group, f"2 x sdpa {name}", _step(lambda: two_sdpa(p), [qkv], dout, mode),
                                {"flops": fl}, ctx)
                _finish_group(rec.rows[start:])


def _compiled(fn, use_compile):
    if not use_compile:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001
        return None


def _measure_copy(rec, group: dict, nbytes: int, device) -> None:
    """The bandwidth reference of an elementwise op: a device copy moving the same bytes (nbytes / 2
    read, nbytes / 2 written). Not a peer (reference="copy"): ours' time over it says how close the
    kernel comes to the memory's speed."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    rec.measure(group, "copy (same bytes)", lambda: dst.copy_(src), {"bytes": nbytes}, reference="copy")


def bench_layer_norm(lk, rec, batches, dtype, device, modes, use_compile, hidden=HIDDEN, dropouts=(0.0,)):
    """dropout(x) + residual -> LayerNorm, ours (one kernel, the mask regenerated in backward) against
    torch eager / torch.compile and a copy of the same bytes, for each dropout p."""
    gen = torch.Generator().manual_seed(2)

    def torch_ln(x, r, w, b, p=0.0):
        return F.layer_norm((F.dropout(x, p) if p else x) + r, (x.shape[-1],), w, b, 1e-12)

    compiled = _compiled(torch_ln, use_compile)
    for B in batches:
        M = B * (LANG + VIS)
        x = torch.randn(M, hidden, generator=gen).to(device, dtype).requires_grad_(True)
        r = torch.randn(M, hidden, generator=gen).to(device, dtype).requires_grad_(True)
        w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
        b = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, hidden, generator=gen).to(device, dtype)
        e = x.element_size()
        for mode in modes:
            for p in dropouts:
                # minimal traffic: fwd reads x, r, writes y; bwd reads dy, x, r, writes dx, dr (ours
                # regenerates the dropout mask: no mask bytes)
                nbytes = M * hidden * e * (3 if mode == "fwd" else 8)
                group = dict(op="layer_norm+residual", mode=mode, shape=f"M{M} N{hidden}", dtype=str(dtype)[6:],
                             masked=False, dropout=p)
                start = len(rec.rows)
                inputs = [x, r, w, b]
                rec.measure(group, "ours layer_norm",
                            _step(lambda: lk.layer_norm(x, w, b, 1e-12, r, dropout_p=p), inputs, dy, mode),
                            {"bytes": nbytes})
                rec.measure(group, "torch eager", _step(lambda: torch_ln(x, r, w, b, p), inputs, dy, mode),
                            {"bytes": nbytes})
                _measure_copy(rec, group, nbytes, device)
                if compiled is not None:
                    rec.measure(group, "torch.compile", _step(lambda: compiled(x, r, w, b, p), inputs, dy, mode),
                                {"bytes": nbytes})
                _finish_group(rec.rows[start:])


def bench_bias_gelu(lk, rec, batches, dtype, device, modes, use_compile, ffn=FFN):
    gen = torch.Generator().manual_seed(3)

    def torch_gelu(x, b):
        return F.gelu(x + b)

    compiled = _compiled(torch_gelu, use_compile)
    for B in batches:
        M = B * (LANG + VIS)
        x = torch.randn(M, ffn, generator=gen).to(device, dtype).requires_grad_(True)
        b = torch.randn(ffn, generator=gen).to(device, dtype).requires_grad_(True)
        dy = torch.randn(M, ffn, generator=gen).to(device, dtype)
        e = x.element_size()
        for mode in modes:
            nbytes = M * ffn * e * (2 if mode == "fwd" else 5)  # fwd: x, y; bwd: + dy, x, dx
            group = dict(op="bias_gelu", mode=mode, shape=f"M{M} N{ffn}", dtype=str(dtype)[6:], masked=False,
                         dropout=0.0)
            start = len(rec.rows)
            rec.measure(group, "ours bias_gelu", _step(lambda: lk.bias_gelu(x, b), [x, b], dy, mode),
                        {"bytes": nbytes})
            rec.measure(group, "torch eager", _step(lambda: torch_gelu(x, b), [x, b], dy, mode), {"bytes": nbytes})
            _measure_copy(rec, group, nbytes, device)
            if compiled is not None:
                rec.measure(group, "torch.compile", _step(lambda: compiled(x, b), [x, b], dy, mode),
                            {"bytes": nbytes})
            _finish_group(rec.rows[start:])


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------
def print_table(rows) -> None:
    cols = ["op", "mode", "shape", "dtype", "dropout", "impl", "ms", "ratio", "TFLOP/s", "GB/s"]
    table = [[str(r.get(c, "") if r.get(c) is not None else ("-" if c != "ms" else "n/a")) for c in cols]
             for r in rows]
    for r, t in zip(rows, table):
        if r.get("error"):
            t[cols.index("ratio")] = "unsupported"
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(v.ljust(w) for v, w in zip(t, widths)))


def run(out_dir, quick: bool = False, batches=None, dtype: torch.dtype = torch.bfloat16,
        use_compile: bool = True) -> list[dict]:
    """Run the benchmark, write ``out_dir``/bench_kernels.jsonl, print a table, return the rows.

    quick: one small batch and few repetitions (and, without CUDA, the Triton interpreter on CPU
    at 2 heads: a smoke test). use_compile: include the torch.compile peers (GPU only; each
    shape costs a compilation). Our kernels launch with lxmert_kernels' heuristics table (its
    default: nothing is benchmarked on the first call).
    """
    lk = _import_kernels()
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        dtype = torch.float32  # the interpreter smoke test: fp32, tiny shapes
    if batches is None:
        batches = ([32] if on_gpu else [2]) if quick else ([32, 128, 512] if on_gpu else [2])
    warmup, reps = (1, 2) if not on_gpu else ((5, 20) if quick else (10, 50))
    heads = HEADS if on_gpu else 2  # the interpreter is slow: 2 heads for the CPU smoke test
    rec = Recorder(environment(), warmup, reps)
    modes = ("fwd", "fwd+bwd")
    dropouts = (0.0,) if quick else (0.0, 0.1)
    use_compile = use_compile and on_gpu
    bench_self_attention(lk, rec, batches, dtype, device, modes, dropouts, heads)
    bench_cross_pair(lk, rec, batches, dtype, device, modes, dropouts, heads)
    bench_layer_norm(lk, rec, batches, dtype, device, modes, use_compile)
    bench_bias_gelu(lk, rec, batches, dtype, device, modes, use_compile)

    out = Path(out_dir)
    (out / "bench_kernels.jsonl").unlink(missing_ok=True)
    for row in rec.rows:
        append_row(out / "bench_kernels.jsonl", row)
    env = rec.env
    print(f"\nlxmert_kernels benchmark on {env['hardware']} (torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit'][:12]}); ratio = time / ours, > 1 means ours is faster; "
          f"rows in {out / 'bench_kernels.jsonl'}")
    print_table(rec.rows)
    return rec.rows


def gpu_check_key(row: dict) -> str:
    """The GPU check's group key of a row (bench/_gpu_plan.py kernel_groups): op, batch, mode."""
    op = row["op"]
    if op == "self_attention":
        op += " L" + row["shape"].split(" L")[1].split()[0]
    batch = row["shape"].split()[0]
    if batch.startswith("M"):  # the elementwise ops: M = batch x 56 rows
        batch = f"B{int(batch[1:]) // (LANG + VIS)}"
    return f"kernels:{op} {batch} {row['mode']}"


def run_gpu_check(batches, rows_path, dry: bool) -> list[dict]:
    """The GPU check's kernel part: bf16 at LXMERT-base shapes, batches (64, 256), forward and
    forward+backward, dropout 0 (and 0.1 for the attention backward and LayerNorm); ours against SDPA (automatic
    choice, and forced efficient / flash / cudnn) and the two-SDPA cross pair with its slicing and
    cat; LayerNorm and GELU against torch eager and a copy of the same bytes. No torch.compile peers
    (a compilation per shape does not fit the time box). Each row is appended to rows_path as soon as
    it is measured. Dry run: the Triton interpreter at 2 heads, fp32, one timed run (a smoke test)."""
    lk = _import_kernels()
    import importlib

    importlib.import_module("lxmert_kernels.tuning").set_autotune(False)  # the heuristics table, as training
    on_gpu = torch.cuda.is_available() and not dry
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    env = environment()
    kind = "cuda events, median, L2 flushed before each run" if on_gpu else "interpreter smoke test (dry run)"

    def keep(row):
        row.update(part="kernels", key=gpu_check_key(row), batch=int(gpu_check_key(row).split(" B")[1].split()[0]),
                   measurement=kind, dry_run=dry, kernel_configs="heuristics table (lxmert_kernels.tuning)")
        if row.get("error"):  # e.g. a forced SDPA backend that does not take this call
            row.update(figure=False, no_figure="error", status=f"no figure (error): {row['error']}")
        else:
            row.update(figure=True, status="ok")
        append_row(rows_path, row)
        print(f"{row['key']:<44} {row['impl']:<32} " + (f"{row['ms']:.4f} ms" if row.get("ms") else row.get("error", "")),
              flush=True)

    rec = Recorder(env, 5 if on_gpu else 1, 30 if on_gpu else 1, on_row=keep,
                   sdpa_backends=("efficient", "flash", "cudnn") if on_gpu else ())
    # the dry run: 2 heads of 16, hidden 64, FFN 128 (the interpreter's time grows with every element)
    heads, head_dim, hidden, ffn = (HEADS, HEAD_DIM, HIDDEN, FFN) if on_gpu else (2, 16, 64, 128)
    modes = ("fwd", "fwd+bwd")
    dropouts = (0.0, 0.1) if on_gpu else (0.0,)
    # the headline first: the cross pair, then self-attention, then the elementwise ops
    bench_cross_pair(lk, rec, batches, dtype, device, modes, dropouts, heads, head_dim)
    bench_self_attention(lk, rec, batches, dtype, device, modes, dropouts, heads, head_dim)
    bench_layer_norm(lk, rec, batches, dtype, device, modes, False, hidden, dropouts)
    bench_bias_gelu(lk, rec, batches, dtype, device, modes, False, ffn)
    return rec.rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-check", action="store_true",
                    help="the GPU check's kernel part (rows appended to GPU_CHECK_ROWS as measured)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for bench_kernels.jsonl")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few runs (interpreter without a GPU)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 32,128,512)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peers")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if args.gpu_check:
        dry = os.environ.get("GPU_CHECK_DRY") == "1"
        rows = run_gpu_check(batches or [64, 256], os.environ.get("GPU_CHECK_ROWS"), dry)
        return 1 if any(r["impl"].startswith("ours") and r.get("error") for r in rows) else 0
    rows = run(args.out, quick=args.quick, batches=batches, dtype=getattr(torch, args.dtype),
               use_compile=not args.no_compile)
    failed_ours = [r for r in rows if r["impl"].startswith("ours") and r.get("error")]
    return 1 if failed_ours else 0


if __name__ == "__main__":
    sys.exit(main())
