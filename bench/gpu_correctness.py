"""The GPU check's correctness pass: each Triton op, and the whole model, against PyTorch.

    python bench/gpu_correctness.py --group attention|cross|elementwise|model [--rows ROWS] [--dry]

bench/gpu_check.py runs the four groups as parallel processes (their Triton compilations overlap).
Each check is one row, appended as soon as it is done: status "ok" or "mismatch" (both are
figures: the errors are in the row), or a "no figure" row when it could not run.

GPU: LXMERT-base shapes (12 heads of 64, hidden 768, FFN 3072, 20 words + 36 objects, batch 64 for
the ops and 8 for the model) in bf16, with the kernels' heuristic launch configurations (no
autotuning: the pass must fit its time box). Each output and gradient is compared with the same
computation in fp32 and must stay within 2x PyTorch's own bf16 error plus a small floor
(DESIGN.md; the rule and the three runs are lxmert_kernels.testing's, as in the kernel tests). A fully masked row must give exact zeros. Dropout: the same seed gives the same
output, the kept fraction is 1 - p, and the output equals the reference under the kernel's own
keep mask.

Dry run (CPU): the Triton interpreter at tiny shapes in fp32 (the interpreter's bf16 is not the
GPU's), fp32 tolerance.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO), str(REPO / "kernels")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _gpu_plan  # noqa: E402

LANG, VIS, HEADS, HEAD_DIM, HIDDEN, FFN = 20, 36, 12, 64, 768, 3072
FP32_TOL = {"attention": 1e-4, "elementwise": 1e-5}


class Shapes:
    def __init__(self, dry: bool):
        self.dry = dry
        self.B = 2 if dry else 64
        self.H = 2 if dry else HEADS
        self.D = 16 if dry else HEAD_DIM
        self.N = 32 if dry else HIDDEN
        self.F = 64 if dry else FFN


# ---------------------------------------------------------------------------------------------- comparison
class Compare:
    """Collects, per named tensor, ours' error and PyTorch's own low-precision error against the
    fp32 (fp64 on CPU) reference; `verdict()` applies the tolerance."""

    def __init__(self, dtype, kind: str):
        self.dtype, self.kind = dtype, kind
        self.items: dict[str, dict] = {}
        self.notes: list[str] = []

    def add(self, name, ours, ref, torch_lowp=None):
        from lxmert_kernels.testing import error_bound, max_err

        bound, terr = error_bound(ref, self.dtype, FP32_TOL[self.kind], torch_lowp)
        self.items[name] = {"err": max_err(ours, ref), "torch_err": terr, "bound": bound,
                            "finite": bool(ours.detach().isfinite().all())}

    def require(self, ok: bool, what: str):
        if not ok:
            self.notes.append(what)

    def verdict(self) -> tuple[str, dict]:
        bad = [n for n, v in self.items.items() if not v["finite"] or not v["err"] <= v["bound"]]
        worst = max((v["err"] / v["bound"] if v["bound"] else math.inf) for v in self.items.values()) \
            if self.items else None
        status = "ok" if not bad and not self.notes else "mismatch: " + "; ".join(
            [f"{n} error {self.items[n]['err']:.3g} > bound {self.items[n]['bound']:.3g}"
             + ("" if self.items[n]["finite"] else " (non-finite)") for n in bad] + self.notes)
        return status, {"errors": self.items, "worst_err_over_bound": worst}


def _ref_dtype(dry):
    import torch

    return torch.float64 if dry else torch.float32


def _setup(dry):
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not dry:
        raise RuntimeError("no CUDA device (use --dry for the CPU interpreter)")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float32 if dry else torch.bfloat16
    return dev, dtype


def _kernels():
    """lxmert_kernels with its heuristic launch configurations (its default; said explicitly here)."""
    import lxmert_kernels as lk

    tuning = getattr(lk, "tuning", None)
    if tuning is None:
        import importlib

        tuning = importlib.import_module("lxmert_kernels.tuning")
    tuning.set_autotune(False)
    return lk


# ---------------------------------------------------------------------------------------------- attention
class Unavailable(RuntimeError):
    """The op is not in this version of lxmert_kernels (a "no figure (unavailable)" row)."""


def _compare_packed(ours_fn, ref_fn, qkv, dout, ref_dt):
    """(Compare of the output and of dq, dk, dv, ours' output, ours' dqkv) of an attention op on one packed
    (B, L, 3, H, D) projection."""
    from lxmert_kernels.testing import run_with_references

    (o, (g_ours,)), (o_ref, (g_ref,)), (o_low, (g_low,)) = run_with_references(ours_fn, ref_fn, [qkv], dout, ref_dt)
    c = Compare(qkv.dtype, "attention")
    c.add("out", o, o_ref, o_low)
    for i, n in enumerate(("dq", "dk", "dv")):
        c.add(n, g_ours[:, :, i], g_ref[:, :, i], None if g_low is None else g_low[:, :, i])
    return c, o, g_ours


def _attention_case(lk, S: Shapes, L: int, masked: bool, dev, dtype, dropout_p=0.0, seed=1234, packed=False):
    import torch
    from lxmert_kernels.reference import attention_ref

    g = torch.Generator().manual_seed(L + 7 * masked)
    B, H, D = S.B, S.H, S.D
    qkv32 = torch.randn(B, L, 3, H, D, generator=g)
    mask = None
    if masked:
        lengths = torch.randint(6, L + 1, (B,), generator=g)
        mask = torch.arange(L)[None] < lengths[:, None]
        mask[0] = False  # a fully masked row: zeros, never NaN
        mask = mask.to(dev)
    dout = torch.randn(B, L, H, D, generator=g).to(dev)
    ref_dt = _ref_dtype(S.dry)

    if packed and not hasattr(lk, "flash_attention_qkv"):
        raise Unavailable("this lxmert_kernels has no flash_attention_qkv")

    def ours_fn(qkv):
        if packed:  # one packed projection in, one gradient tensor out
            return lk.flash_attention_qkv(qkv, key_padding_mask=mask, dropout_p=dropout_p,
                                          seed=seed if dropout_p else None)
        q, k, v = qkv.unbind(2)
        return lk.flash_attention(q, k, v, key_padding_mask=mask, dropout_p=dropout_p, seed=seed if dropout_p else None)

    keep = None
    if dropout_p:
        keep = lk.attention_dropout_mask(seed, dropout_p, B, H, L, L, device=dev)

    def ref_fn(qkv, compute_dtype):
        q, k, v = qkv.unbind(2)
        return attention_ref(q, k, v, mask, dropout_p, keep, None, compute_dtype)

    qkv = qkv32.to(dev).to(dtype)
    c, o, g_ours = _compare_packed(ours_fn, ref_fn, qkv, dout, ref_dt)
    if masked:
        c.require(o[0].abs().max().item() == 0.0, "the fully masked row's output is not exactly 0")
        c.require(g_ours[0, :, 0].abs().max().item() == 0.0, "the fully masked row's dq is not exactly 0")
    if dropout_p:
        again = ours_fn(qkv)
        c.require(torch.equal(again, o), "the same seed gave a different output")
        kept = keep.float().mean().item()
        sd = math.sqrt(dropout_p * (1 - dropout_p) / keep.numel())
        c.require(abs(kept - (1 - dropout_p)) < 6 * sd + 1e-3, f"kept fraction {kept:.4f}, expected {1 - dropout_p}")
    return c, f"B{B} L{L} H{H} D{D}"


def _cross_case(lk, S: Shapes, dev, dtype, dropout_p=0.0, seed=4321):
    import torch
    from lxmert_kernels.reference import cross_attention_ref

    g = torch.Generator().manual_seed(11)
    B, H, D = S.B, S.H, S.D
    L = LANG + VIS
    qkv32 = torch.randn(B, L, 3, H, D, generator=g)
    lengths = torch.randint(6, LANG + 1, (B,), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, :LANG] = torch.arange(LANG)[None] < lengths[:, None]
    mask[0, :LANG] = False  # row 0: no words, so its objects attend to nothing
    mask = mask.to(dev)
    dout = torch.randn(B, L, H, D, generator=g).to(dev)
    ref_dt = _ref_dtype(S.dry)
    keep = lk.cross_attention_dropout_mask(seed, dropout_p, B, H, L, device=dev, n_lang=LANG) if dropout_p else None

    def ours_fn(qkv):
        return lk.bidirectional_cross_attention(qkv, LANG, key_padding_mask=mask, dropout_p=dropout_p,
                                                seed=seed if dropout_p else None)

    def ref_fn(qkv, compute_dtype):
        return cross_attention_ref(qkv, LANG, mask, dropout_p, keep, None, compute_dtype)

    qkv = qkv32.to(dev).to(dtype)
    c, o, g_ours = _compare_packed(ours_fn, ref_fn, qkv, dout, ref_dt)
    c.require(o[0, LANG:].abs().max().item() == 0.0, "objects of a sentence with no kept word: output not exactly 0")
    if dropout_p:
        c.require(torch.equal(ours_fn(qkv), o), "the same seed gave a different output")
        # the kernel's keep mask covers the two cross blocks only (lang->vision, vision->lang)
        k_lv, k_vl = keep[:, :, :LANG, LANG:], keep[:, :, LANG:, :LANG]
        kept = (k_lv.float().sum() + k_vl.float().sum()).item() / (k_lv.numel() + k_vl.numel())
        sd = math.sqrt(dropout_p * (1 - dropout_p) / (k_lv.numel() + k_vl.numel()))
        c.require(abs(kept - (1 - dropout_p)) < 6 * sd + 1e-3, f"kept fraction {kept:.4f}, expected {1 - dropout_p}")
    return c, f"B{B} {LANG}+{VIS} H{H} D{D}"


# ---------------------------------------------------------------------------------------------- elementwise
def _layer_norm_case(lk, S: Shapes, dev, dtype, dropout_p=0.0, seed=99):
    import torch
    from lxmert_kernels.reference import layer_norm_ref
    from lxmert_kernels.testing import run_with_references

    g = torch.Generator().manual_seed(5)
    M, N = S.B * (LANG + VIS), S.N
    x32, r32 = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g)
    w32, b32 = 1 + 0.1 * torch.randn(N, generator=g), 0.1 * torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g).to(dev)
    keep = lk.layer_norm_dropout_mask(seed, dropout_p, (M, N), device=dev) if dropout_p else None
    ref_dt = _ref_dtype(S.dry)

    def ours_fn(x, r, w, b):
        return lk.layer_norm(x, w, b, 1e-12, residual=r, dropout_p=dropout_p, seed=seed if dropout_p else None)

    def ref_fn(x, r, w, b, compute_dtype):
        return layer_norm_ref(x, w, b, 1e-12, r, dropout_p, keep, compute_dtype)

    inputs = [t.to(dev).to(dtype) for t in (x32, r32, w32, b32)]
    (o, g_ours), (o_ref, g_ref), (o_low, g_low) = run_with_references(ours_fn, ref_fn, inputs, dy, ref_dt)
    c = Compare(dtype, "elementwise")
    c.add("out", o, o_ref, o_low)
    for n, g_o, g_r, g_l in zip(("dx", "dresidual", "dweight", "dbias"), g_ours, g_ref, g_low):
        c.add(n, g_o, g_r, g_l)
    if dropout_p:
        again = ours_fn(*inputs)
        c.require(torch.equal(again, o), "the same seed gave a different output")
        kept = keep.float().mean().item()
        sd = math.sqrt(dropout_p * (1 - dropout_p) / keep.numel())
        c.require(abs(kept - (1 - dropout_p)) < 6 * sd + 1e-3, f"kept fraction {kept:.4f}, expected {1 - dropout_p}")
    return c, f"M{M} N{N}"


def _bias_gelu_case(lk, S: Shapes, dev, dtype):
    import torch
    from lxmert_kernels.reference import bias_gelu_ref
    from lxmert_kernels.testing import run_with_references

    g = torch.Generator().manual_seed(6)
    M, F = S.B * (LANG + VIS), S.F
    x32, b32 = torch.randn(M, F, generator=g), torch.randn(F, generator=g)
    dy = torch.randn(M, F, generator=g).to(dev)
    ref_dt = _ref_dtype(S.dry)

    inputs = [t.to(dev).to(dtype) for t in (x32, b32)]
    (o, g_ours), (o_ref, g_ref), (o_low, g_low) = run_with_references(lk.bias_gelu, bias_gelu_ref, inputs, dy, ref_dt)
    c = Compare(dtype, "elementwise")
    c.add("out", o, o_ref, o_low)
    for n, g_o, g_r, g_l in zip(("dx", "dbias"), g_ours, g_ref, g_low):
        c.add(n, g_o, g_r, g_l)
    return c, f"M{M} N{F}"


# ---------------------------------------------------------------------------------------------- model
def _model_case(S: Shapes, dev, dtype):
    """The base model (tiny in a dry run) with the triton backend and kernels against eager, same
    weights and batch, no dropout: the loss, each loss term and every parameter's gradient, as
    relative errors (norm of the difference / norm of the fp32 reference), within 2x eager's own in
    that dtype plus a floor. The reference: eager in fp32 with TF32 off (fp64 in a dry run)."""
    import torch

    from lxmert_fast import LxmertConfig, LxmertForPreTraining
    from tests.helpers import no_dropout, random_batch, random_labels

    # dry: the tiny preset with 2 heads of 16 (the kernels take head dims 16..128), one layer per encoder
    config = no_dropout(LxmertConfig.preset("tiny", num_attention_heads=2, l_layers=1, x_layers=1, r_layers=1)
                        if S.dry else LxmertConfig.preset("base"))
    B, T, O = (2, 8, 6) if S.dry else (8, LANG, VIS)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    eager = LxmertForPreTraining(config.replace(attention_backend="eager")).to(dev).train()
    fast = LxmertForPreTraining(config.replace(attention_backend="triton", kernels="triton")).to(dev).train()
    fast.load_state_dict(eager.state_dict())
    inputs = random_batch(config, batch=B, tokens=T, objects=O, lengths=[T - (3 * i) % (T - 4) for i in range(B)],
                          generator=g)
    labels = random_labels(config, inputs, generator=g)

    def to(o):
        if isinstance(o, torch.Tensor):
            return o.to(dev)
        if isinstance(o, dict):
            return {k: to(v) for k, v in o.items()}
        return tuple(to(v) for v in o)

    inputs, labels = to(inputs), to(labels)

    def run(model, dt):
        model.zero_grad(set_to_none=True)
        cast = dict(inputs, visual_feats=inputs["visual_feats"].to(dt), visual_pos=inputs["visual_pos"].to(dt))
        out = model(**cast, **labels)
        out.loss.backward()
        losses = {"loss": out.loss.detach().double(), **{k: v.detach().double() for k, v in out.losses.items()}}
        grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
        return losses, grads

    ref_dt = torch.float64 if S.dry else torch.float32
    ref = run(eager.to(ref_dt), ref_dt)
    eager.to(dtype)
    fast.to(dtype)
    e = run(eager, dtype) if dtype != torch.float32 else None
    f = run(fast, dtype)

    def rel(x, r):
        return ((x - r).norm() / r.norm().clamp_min(1e-12)).item()

    floor = 1e-3 if dtype == torch.bfloat16 else 1e-4
    items, bad = {}, []
    for group, i in (("loss", 0), ("grad", 1)):
        for name, r in ref[i].items():
            if r.norm() == 0:
                continue
            ef = rel(f[i][name], r)
            ee = rel(e[i][name], r) if e is not None else 0.0
            bound = 2 * ee + floor
            finite = bool(f[i][name].isfinite().all())
            if not finite or ef > bound:
                bad.append(f"{group} {name}: {ef:.2e} > {bound:.2e}" + ("" if finite else " (non-finite)"))
            if group == "loss" or ef > 0.5 * bound:
                items[f"{group} {name}"] = {"err": ef, "torch_err": ee if e is not None else None, "bound": bound}
    worst = max(rel(f[i][n], r) / (2 * (rel(e[i][n], r) if e is not None else 0) + floor)
                for i in (0, 1) for n, r in ref[i].items() if r.norm() > 0)
    status = "ok" if not bad else f"mismatch: {len(bad)} values beyond 2x eager's error: " + "; ".join(bad[:6])
    return status, {"errors": items, "worst_err_over_bound": worst, "compared": sum(len(x) for x in ref),
                    "error_kind": "relative (norm)"}, f"base B{B} T{T} O{O}" if not S.dry else f"tiny B{B} T{T} O{O}"


# ---------------------------------------------------------------------------------------------- driver
def checks_of(group: str, lk, S: Shapes, dev, dtype):
    """check name -> a callable returning (Compare, shape)."""
    if group == "attention":
        return {"flash_attention L20 masked": lambda: _attention_case(lk, S, LANG, True, dev, dtype),
                "flash_attention L36": lambda: _attention_case(lk, S, VIS, False, dev, dtype),
                "flash_attention dropout": lambda: _attention_case(lk, S, LANG, True, dev, dtype, dropout_p=0.1),
                "flash_attention_qkv L20 masked": lambda: _attention_case(lk, S, LANG, True, dev, dtype, packed=True)}
    if group == "cross":
        return {"cross_pair 20+36 masked": lambda: _cross_case(lk, S, dev, dtype),
                "cross_pair dropout": lambda: _cross_case(lk, S, dev, dtype, dropout_p=0.1)}
    if group == "elementwise":
        return {"layer_norm+residual": lambda: _layer_norm_case(lk, S, dev, dtype),
                "layer_norm dropout": lambda: _layer_norm_case(lk, S, dev, dtype, dropout_p=0.1),
                "bias_gelu": lambda: _bias_gelu_case(lk, S, dev, dtype)}
    raise ValueError(group)


def run_group(group: str, rows: str | None, dry: bool) -> int:
    from _common import append_row

    names = _gpu_plan.CORRECTNESS[group]
    try:
        dev, dtype = _setup(dry)
        import torch

        S = Shapes(dry)
        base = {"part": "correctness", "group": group, "dtype": str(dtype)[6:], "device": dev, "dry_run": dry,
                "hardware": torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"}
        if group != "model":
            lk = _kernels()
            base["kernel_configs"] = "heuristics table (lxmert_kernels.tuning, autotuning off)"
            cases = checks_of(group, lk, S, dev, dtype)
    except Exception as err:  # noqa: BLE001  (no device, no kernels package...)
        traceback.print_exc()
        kind = "missing package" if isinstance(err, ImportError) else "error"
        for n in names:
            append_row(rows, {"part": "correctness", "key": f"correctness:{n}", "check": n, "figure": False,
                              "no_figure": kind, "status": f"no figure ({kind}): {type(err).__name__}: {err}"[:400]})
        return 1
    rc = 0
    for n in names:
        t0 = time.perf_counter()
        row = {**base, "key": f"correctness:{n}", "check": n}
        try:
            if group == "model":
                status, fields, shape = _model_case(S, dev, dtype)
            else:
                c, shape = cases[n]()
                status, fields = c.verdict()
            row.update(status=status, figure=True, shape=shape, **fields)
        except Unavailable as err:
            row.update(figure=False, no_figure="unavailable", status=f"no figure (unavailable): {err}")
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            row.update(figure=False, no_figure="error", status=f"no figure (error): {type(err).__name__}: {err}"[:400])
            rc = 1
        row["seconds"] = round(time.perf_counter() - t0, 2)  # the first check of a group includes compilation
        append_row(rows, row)
        print(f"{n}: {row['status'][:200]} ({row['seconds']} s)", flush=True)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", required=True, choices=list(_gpu_plan.CORRECTNESS))
    ap.add_argument("--rows", default=os.environ.get("GPU_CHECK_ROWS"))
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1")
    a = ap.parse_args(argv)
    if a.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return run_group(a.group, a.rows, a.dry)


if __name__ == "__main__":
    sys.exit(main())
