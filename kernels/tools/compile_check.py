"""Compile the kernels for a GPU target without a GPU, exactly as a real launch specialises them.

    python kernels/tools/compile_check.py [--arch 90] [--quick]      # compile every variant, ok/FAIL lines
    python kernels/tools/compile_check.py --report [--space]         # one JSON line per variant (sm_90 figures)
    python kernels/tools/compile_check.py --launches FILE [--tests-only] [--fresh-cache]   # recorded launches

How: the host code of each op runs on ``meta`` tensors at the LXMERT base-config shapes
(B=64, H=12, D=64, 20 words + 36 objects, hidden 768, FFN 3072; and a 512-token self-attention
for the multi-launch kernels) with ``JITFunction.run``
replaced by a recorder, so every launch the op would make (kernel, arguments, constexprs,
warps, stages) is captured without a device. Each launch is then specialised as Triton's
launcher does (pointers 16-byte aligned, integers divisible by 16 get divisibility hints,
integers equal to 1 become constexpr, ``do_not_specialize`` respected) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. The report runs the
ptxas / cuobjdump bundled with Triton on the result: registers, spill bytes, shared memory,
SASS instruction count. ``--space`` adds every autotuning candidate (``heuristic: false``).

``--launches FILE`` builds instead the launches a test run recorded (``launch_recorder.py``: one JSON
line per specialisation), each kernel imported from its module (a test module from its file, so the
test suite's own kernels are built too; ``--tests-only``: only those), timed one by one;
``--fresh-cache`` compiles into an empty Triton cache, so that every variant is really compiled.

Needs TRITON_INTERPRET unset and Triton's CUDA backend (ptxas ships in the triton wheel).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import launch_keys  # noqa: E402  (kernels/tools)
import lxmert_kernels  # noqa: E402,F401
from lxmert_kernels import _attention_core as core  # noqa: E402
from lxmert_kernels import _common  # noqa: E402

ln = importlib.import_module("lxmert_kernels.layer_norm")
ge = importlib.import_module("lxmert_kernels.gelu")

H200_SMS = 132
BASE = dict(B=64, H=12, D=64, n_lang=20, n_vis=36, hidden=768, ffn=3072, long=512)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# capture launches
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def recording():
    """Replace JITFunction.run by a recorder; yields the list of (kernel, args, kwargs, grid)."""
    launches = []
    real_run = JITFunction.run
    real_hint = _common.num_programs_hint

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, grid))

    JITFunction.run = record
    for mod in (_common, ln, ge):
        if hasattr(mod, "num_programs_hint"):
            mod.num_programs_hint = lambda device, interpreted: 4 * H200_SMS
    try:
        yield launches
    finally:
        JITFunction.run = real_run
        for mod in (_common, ln, ge):
            if hasattr(mod, "num_programs_hint"):
                mod.num_programs_hint = real_hint


def specialise(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) as Triton's launcher builds them for this call."""
    return launch_keys.specialise(kernel.params, args, kwargs)


def compile_launch(kernel, args, kwargs, arch):
    signature, constexprs, attrs, options = specialise(kernel, args, kwargs)
    src = ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), options


# ----------------------------------------------------------------------------------------------
# figures from the bundled ptxas / cuobjdump
# ----------------------------------------------------------------------------------------------
def _tool(name, arch):
    """The ptxas Triton itself uses for ``arch`` (its PTX version needs it), and the bundled cuobjdump."""
    from triton import knobs
    if name == "ptxas":
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    return getattr(knobs.nvidia, name).path


def figures(compiled, arch):
    """regs, spill bytes (stores + loads), smem bytes, SASS instruction count and ptxas warnings
    (e.g. serialised wgmma) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        cubin = os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([_tool("ptxas", arch), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", ptx,
                              "-o", os.path.join(tmp, "again.cubin")], capture_output=True, text=True)
        log = res.stdout + res.stderr
        sass = subprocess.run([_tool("cuobjdump", arch), "-sass", cubin], capture_output=True, text=True).stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    n_sass = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, flags=re.M))
    warnings = sorted({re.sub(r"^.*?warning\s*:\s*", "", line) for line in log.splitlines() if "warning" in line.lower()})
    return dict(regs=regs, spill_bytes=spill, smem_bytes=compiled.metadata.shared, sass_instructions=n_sass,
                ptxas_warnings=warnings)


# ----------------------------------------------------------------------------------------------
# the scenarios: host code of every op at the base-config shapes
# ----------------------------------------------------------------------------------------------
def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def scenarios(dtypes, dims, quick):
    """Yield (label, lengths (Lq, Lk) per direction or None, thunk running the op's host code)."""
    B, H = BASE["B"], BASE["H"]
    nl, nv = BASE["n_lang"], BASE["n_vis"]
    for dt in dtypes:
        dtype = DTYPES[dt]
        for D in dims:
            for p in ((0.1,) if quick else (0.0, 0.1)):
                seed = None if p == 0.0 else torch.empty(1, dtype=torch.int64, device="meta")
                scale = D ** -0.5

                def cross(p=p, seed=seed, D=D, dtype=dtype):
                    L = nl + nv
                    qkv = _meta(B, L, 3, H, D, dtype=dtype)
                    mask = _meta(B, L, dtype=torch.bool)
                    q, k, v = qkv.unbind(2)
                    o, lse = core.attention_forward(q, k, v, mask, scale, p, seed, two_segments=True, n_split=nl)
                    d = _meta(B, L, 3, H, D, dtype=dtype)
                    core.attention_backward(o, q, k, v, o, lse, mask, scale, p, seed, *d.unbind(2),
                                            two_segments=True, n_split=nl)

                yield f"cross {nl}+{nv} {dt} D={D} p={p}", [(nl, nv), (nv, nl)], cross
                for L, masked in ((nl, True), (nv, False)):
                    def self_attn(p=p, seed=seed, D=D, dtype=dtype, L=L, masked=masked):
                        qkv = _meta(B, L, 3, H, D, dtype=dtype)
                        mask = _meta(B, L, dtype=torch.bool) if masked else None
                        q, k, v = qkv.unbind(2)
                        o, lse = core.attention_forward(q, k, v, mask, scale, p, seed)
                        d = _meta(B, L, 3, H, D, dtype=dtype)
                        core.attention_backward(o, q, k, v, o, lse, mask, scale, p, seed, *d.unbind(2))

                    yield f"self {L}x{L} {dt} D={D} p={p} mask={masked}", [(L, L)], self_attn

                def long_self(p=p, seed=seed, D=D, dtype=dtype, L=BASE["long"]):
                    qkv = _meta(B // 8, L, 3, H, D, dtype=dtype)
                    mask = _meta(B // 8, L, dtype=torch.bool)
                    q, k, v = qkv.unbind(2)
                    o, lse = core.attention_forward(q, k, v, mask, scale, p, seed)
                    d = _meta(B // 8, L, 3, H, D, dtype=dtype)
                    core.attention_backward(o, q, k, v, o, lse, mask, scale, p, seed, *d.unbind(2))

                # beyond one tile: the multi-launch kernels and their heuristic blocks
                yield f"self {BASE['long']}x{BASE['long']} {dt} D={D} p={p} mask=True", [(BASE["long"],) * 2], long_self
        for p in ((0.1,) if quick else (0.0, 0.1)):
            def layer_norm(p=p, dtype=dtype):
                x = _meta(B, nl + nv, BASE["hidden"], dtype=dtype)
                w = _meta(BASE["hidden"], dtype=torch.float32)
                seed = None if p == 0.0 else torch.empty(1, dtype=torch.int64, device="meta")
                y, mean, rstd = ln._ln_forward(x, w, w, x, seed, 1e-12, p)
                ln._ln_backward(y, x, w, w, x, mean, rstd, seed, p)

            yield f"layer_norm {dt} N={BASE['hidden']} p={p}", None, layer_norm

        def gelu(dtype=dtype):
            x = _meta(B, nl + nv, BASE["ffn"], dtype=dtype)
            b = _meta(BASE["ffn"], dtype=dtype)
            ge._gelu_forward(x, b)
            ge._gelu_backward(x, x, b)

        yield f"bias_gelu {dt} N={BASE['ffn']}", None, gelu


def useful_fraction(kernel_name, constexprs_by_name, lengths):
    """Fraction of the (query, key) score tile elements that are real work, summed over the
    directions of the launch (None for non-attention kernels)."""
    c = constexprs_by_name
    if lengths is None or not ({"BLOCK_M", "BLOCK_N"} <= set(c) or "BLOCK_Q" in c):
        return None
    real = tiles = 0
    for i, (lq, lk) in enumerate(lengths):
        if "BLOCK_Q" in c:  # one tile per direction (short kernels); BLOCK_Q/BLOCK_K per direction
            bq, bk = (c["BLOCK_Q"], c["BLOCK_K"]) if i == 0 else (c["BLOCK_K"], c["BLOCK_Q"])  # swapped
            tiles += bq * bk * triton.cdiv(lq, bq) * triton.cdiv(lk, bk)
        else:
            bm, bn = c["BLOCK_M"], c["BLOCK_N"]
            tiles += bm * bn * triton.cdiv(lq, bm) * triton.cdiv(lk, bn)
        real += lq * lk
    return round(real / tiles, 3)


def autotune_space(kernel):
    """Candidate configs of a kernel when the package declares them (``heuristic: false`` rows)."""
    space = getattr(core, "autotune_candidates", None)
    return space(kernel) if space is not None else []


def _module_of_row(row, cache):
    """The module that defines a recorded kernel: imported by name inside lxmert_kernels, else from its file
    (a test module: its folder goes first on sys.path, for its own imports such as _helpers); ``cache``: the
    modules imported from files so far, by path."""
    if row["module"].split(".")[0] == "lxmert_kernels":
        return importlib.import_module(row["module"])
    path = row["file"]
    if path not in cache:
        sys.path.insert(0, os.path.dirname(path))
        spec = importlib.util.spec_from_file_location(f"_recorded_{len(cache)}_{row['module']}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cache[path] = module
    return cache[path]


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): a compile's cost, whatever else
    the machine runs."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def build_recorded(path, arch, tests_only):
    """Compile every row of a launch_recorder file for ``arch``: ok / FAIL lines, a summary; 1 on a failure."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if tests_only:
        rows = [r for r in rows if r["module"].split(".")[0] != "lxmert_kernels"]
    t0 = time.time()
    failures, modules, cpu_total = [], {}, 0.0
    for row in rows:
        name = f"{row['module']}.{row['kernel']}"
        try:
            kernel = getattr(_module_of_row(row, modules), row["kernel"])
            signature, constexprs, attrs, options = launch_keys.build_inputs(kernel, row)
            before = _cpu_seconds()
            triton.compile(ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=options)
            spent = _cpu_seconds() - before
            cpu_total += spent
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            failures.append(name)
            print(f"FAIL {name} {row['constexprs']} {row['options']} (test {row.get('test')}): "
                  f"{type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        print(f"ok   {name} {row['constexprs']} div16={sorted(row['attrs'])} {row['options']} {spent:.2f} cpu-s",
              flush=True)
    print(f"{len(rows) - len(failures)} recorded variants compiled for sm_{arch} (triton {triton.__version__}), "
          f"{len(failures)} failed, {time.time() - t0:.0f}s, {cpu_total:.0f} cpu-s")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="bf16, D=64, dropout on: the production variants only")
    ap.add_argument("--report", action="store_true", help="one JSON line per variant with ptxas/cuobjdump figures")
    ap.add_argument("--space", action="store_true", help="with --report: every autotuning candidate too")
    ap.add_argument("--launches", metavar="FILE", help="build the launches a test run recorded (launch_recorder.py)")
    ap.add_argument("--tests-only", action="store_true", help="with --launches: only kernels defined outside "
                    "lxmert_kernels (the test suite's own)")
    ap.add_argument("--fresh-cache", action="store_true", help="compile into an empty temporary Triton cache "
                    "(timings of real compilations)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.fresh_cache:
            os.environ["TRITON_CACHE_DIR"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="compile_check_"))
        if args.launches:
            sys.exit(build_recorded(args.launches, args.arch, args.tests_only))
        sys.exit(build_scenarios(args))


def build_scenarios(args):
    """The ops' launches at the LXMERT base shapes (the default mode): ok / FAIL lines or --report rows."""
    dtypes = ["bf16"] if (args.quick or args.report) else ["bf16", "fp16", "fp32"]
    dims = [64] if (args.quick or args.report) else [32, 64, 128]
    t0 = time.time()
    n, failures, seen = 0, [], set()
    for label, lengths, thunk in scenarios(dtypes, dims, args.quick):
        with recording() as launches:
            thunk()
        for kernel, kargs, kwargs, grid in launches:
            variants = [(kwargs, True)]
            if args.space:
                variants += [({**kwargs, **cfg}, False) for cfg in autotune_space(kernel)]
            for kw, heuristic in variants:
                sig, constexprs, _, options = specialise(kernel, kargs, kw)
                by_name = {kernel.params[i[0]].name: v for i, v in constexprs.items()}
                config = {k: v for k, v in by_name.items() if k.startswith("BLOCK")}
                config.update(options)
                key = (kernel.__name__, json.dumps(sorted(by_name.items()), default=str), json.dumps(options))
                if key in seen:
                    continue
                seen.add(key)
                try:
                    compiled, _ = compile_launch(kernel, kargs, kw, args.arch)
                    n += 1
                except Exception as e:  # noqa: BLE001
                    failures.append(f"{label} {kernel.__name__} {config}")
                    print(f"FAIL {label} {kernel.__name__} {config}: {type(e).__name__}: {str(e)[:2000]}")
                    continue
                if args.report:
                    row = dict(kernel=kernel.__name__, scenario=label, config=config, heuristic=heuristic,
                               flags={k: v for k, v in by_name.items() if k.isupper() and not k.startswith("BLOCK")},
                               **figures(compiled, args.arch))
                    frac = useful_fraction(kernel.__name__, by_name, lengths)
                    if frac is not None:
                        row["useful_fraction"] = frac
                    print(json.dumps(row), flush=True)
                else:
                    print(f"ok   {label} {kernel.__name__} {config}  shared={compiled.metadata.shared}")
    print(f"{n} variants compiled for sm_{args.arch} (triton {triton.__version__}), {len(failures)} failed, "
          f"{time.time() - t0:.0f}s", file=sys.stderr if args.report else sys.stdout)
    return 1 if failures else 0


if __name__ == "__main__":
    main()
