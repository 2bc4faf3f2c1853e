"""Compile every kernel variant for a GPU target without a GPU (frontend + ptxas).

    python kernels/tools/compile_check.py [--arch 90] [--quick]

Catches what the interpreter does not: type errors of the compiled language, shared-memory
overflow at the autotune configs, unsupported ops. Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lxmert_kernels import _attention_core as core  # noqa: E402
import importlib  # noqa: E402

# the package re-exports functions named like these modules: import the modules themselves
gelu = importlib.import_module("lxmert_kernels.gelu")
layer_norm = importlib.import_module("lxmert_kernels.layer_norm")

PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def signature(kernel, pointer_types, constexprs, floats=()):
    """Build an ASTSource signature: pointers from ``pointer_types`` (name -> type), constexprs
    from ``constexprs``, named floats as fp32, everything else i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name == "SEED":
            sig[name] = "*i64"  # the dropout seed is read from a device tensor
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, pointer_types, constexprs, floats, num_warps, num_stages, arch):
    sig = signature(kernel, pointer_types, constexprs, floats)
    src = ASTSource(kernel, signature=sig, constexprs=constexprs)
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
    return out.metadata.shared


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="one config per kernel, fewer flag combinations")
    args = ap.parse_args()
    n = 0
    t0 = time.time()
    failures = []

    def run(label, *a):
        nonlocal n
        try:
            shared = compile_one(*a, arch=args.arch)
            n += 1
            print(f"ok   {label}  shared={shared}")
        except Exception as e:  # noqa: BLE001
            failures.append(label)
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}")

    dtypes = ["bf16"] if args.quick else ["fp16", "bf16", "fp32"]
    dims = [64] if args.quick else [32, 64, 128]
    attn = [
        ("fwd", core._attn_fwd_kernel, core._FWD_CONFIGS, ["Q", "K", "V", "O"]),
        ("dkdv", core._attn_bwd_dkdv_kernel, core._DKDV_CONFIGS, ["Q", "K", "V", "DO", "DK", "DV"]),
        ("dq", core._attn_bwd_dq_kernel, core._DQ_CONFIGS, ["Q", "K", "V", "DO", "DQ"]),
    ]
    # (dtype, D, (TWO_SEGMENTS, HAS_MASK, HAS_DROPOUT), every autotune config?)
    if args.quick:
        combos = [("bf16", 64, (False, True, False), False), ("bf16", 64, (True, True, True), False)]
    else:
        combos = [("bf16", 64, (True, True, True), True),      # production path, all configs
                  ("fp32", 128, (False, True, True), True),    # largest tiles in shared memory
                  ("fp16", 128, (False, False, False), True)]
        flag_sets = [(False, False, False), (False, True, True), (True, True, False)]
        combos += [(dt, D, f, False) for dt in dtypes for D in dims for f in flag_sets]
    for name, kernel, configs, data_ptrs in attn:
        for dt, D, (two, has_mask, has_drop), all_cfgs in combos:
            ptrs = {p: PTR[dt] for p in data_ptrs}
            ptrs.update(LSE="*fp32", DELTA="*fp32", MASK="*u8")
            for bm, bn, w, s in (configs if all_cfgs else configs[-1:]):
                const = dict(D=D, TWO_SEGMENTS=two, HAS_MASK=has_mask, HAS_DROPOUT=has_drop,
                             COMPUTE_F32=dt == "fp32", IEEE=dt == "fp32", BLOCK_M=bm, BLOCK_N=bn)
                run(f"{name} {dt} D={D} two={two} mask={has_mask} drop={has_drop} cfg={bm},{bn},{w},{s}",
                    kernel, ptrs, const, ("softmax_scale", "dropout_p"), w, s)
    for dt, D in itertools.product(dtypes, dims):
        run(f"bwd_preprocess {dt} D={D}", core._attn_bwd_preprocess_kernel,
            {"O": PTR[dt], "DO": PTR[dt], "DELTA": "*fp32"}, dict(D=D, BLOCK_M=64), (), 4, 2)
    run("dropout_mask", core._attn_dropout_mask_kernel, {"OUT": "*u8"}, dict(BLOCK_M=32, BLOCK_N=32),
        ("dropout_p",), 4, 2)

    for dt in dtypes:
        for N in ([768] if args.quick else [48, 768, 4096, 8192]):
            bm, bn, launch = layer_norm._launch_params(N, False)
            w = launch["num_warps"]
            for has_res, has_drop in ([(True, True)] if args.quick else [(False, False), (True, True)]):
                const = dict(HAS_RES=has_res, HAS_DROPOUT=has_drop, BLOCK_M=bm, BLOCK_N=bn)
                run(f"ln_fwd {dt} N={N} res={has_res} drop={has_drop}", layer_norm._ln_fwd_kernel,
                    {"X": PTR[dt], "RES": PTR[dt], "W": "*fp32", "B": "*fp32", "Y": PTR[dt],
                     "MEAN": "*fp32", "RSTD": "*fp32"}, const, ("eps", "dropout_p"), w, 2)
                run(f"ln_bwd {dt} N={N} res={has_res} drop={has_drop}", layer_norm._ln_bwd_kernel,
                    {"DY": PTR[dt], "X": PTR[dt], "RES": PTR[dt], "W": PTR[dt], "MEAN": "*fp32", "RSTD": "*fp32",
                     "DX": PTR[dt], "DRES": PTR[dt], "DW_PART": "*fp32", "DB_PART": "*fp32"},
                    const, ("dropout_p",), w, 2)
        run(f"bias_gelu_fwd {dt}", gelu._bias_gelu_fwd_kernel, {"X": PTR[dt], "BIAS": PTR[dt], "Y": PTR[dt]},
            dict(BLOCK_M=8, BLOCK_N=256), (), 4, 2)
        run(f"bias_gelu_bwd {dt}", gelu._bias_gelu_bwd_kernel,
            {"DY": PTR[dt], "X": PTR[dt], "BIAS": PTR[dt], "DX": PTR[dt], "DB_PART": "*fp32"},
            dict(BLOCK_M=32, BLOCK_N=256), (), 8, 2)
    run("ln_dropout_mask", layer_norm._ln_dropout_mask_kernel, {"OUT": "*u8"}, dict(BLOCK_M=4, BLOCK_N=1024),
        ("dropout_p",), 4, 2)

    print(f"{n} variants compiled for sm_{args.arch}, {len(failures)} failed, {time.time() - t0:.0f}s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
