"""One pre-training step compiled (`--compile default`) against ours eager and transformers, one process.

    python bench/step_compiled.py [--batch 16] [--preset base] [--repeats 5] [--backend sdpa] [--json OUT]

A step is forward + backward of the summed pre-training loss + torch's AdamW step, for the three
models with the same weights and the same batch (bench/step_vs_hf.py's: 20 tokens, 36 objects,
15% words and objects masked): transformers' LxmertForPreTraining, ours eager and ours compiled
(`torch.compile(fullgraph=True, dynamic=False)` of the forward, the row budget of the batch's shape).
They are timed in turn (ours eager, ours compiled, transformers, ...) after a warm-up that includes
the compilation, and the medians compared.

It also counts what one step asks of the dispatcher (torch's profiler), forward and backward apart:
the non-view aten calls made at the top of the dispatcher (views apart), and for the compiled model
also the kernels inductor generated, each one call (inductor's kernel profiling on).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers  # noqa: E402

from bench._common import append_row, git_commit  # noqa: E402
from bench.step_vs_hf import parse_step_args, peer_and_ours, pretraining_batch  # noqa: E402
from lxmert_fast import LxmertForPreTraining  # noqa: E402
from lxmert_fast.model.rows import RowBudget  # noqa: E402

# ops that only make a new view of a tensor (no kernel on a GPU)
VIEW_OPS = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::transpose", "aten::t",
            "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
            "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::detach", "aten::alias", "aten::narrow",
            "aten::chunk", "aten::numpy_T", "aten::lift_fresh", "aten::expand_as", "aten::view_as", "aten::flatten",
            "aten::contiguous", "aten::_reshape_alias", "aten::unflatten", "aten::movedim", "aten::swapaxes",
            "aten::_nested_view_from_buffer", "aten::indices", "aten::values"}


def top_level_calls(fn, kernels: bool = False) -> tuple[int, int]:
    """(non-view, view) calls at the top of the dispatcher while ``fn()`` runs: aten ops, and with
    ``kernels`` the kernels inductor generated (nested calls, e.g. the ops a composite op dispatches
    itself, are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events()
              if e.name.startswith("aten::") or (kernels and ("cpp_fused" in e.name or "triton_" in e.name))]
    spans = sorted((e.time_range.start, e.time_range.end, e.name, e.thread) for e in events)
    top: list[tuple[int, int, str, int]] = []
    open_until: dict[int, int] = {}
    for start, end, name, thread in spans:
        if start < open_until.get(thread, -1):
            continue  # inside an earlier top-level call on this thread
        top.append((start, end, name, thread))
        open_until[thread] = end
    view = sum(1 for _, _, name, _ in top if name in VIEW_OPS)
    return len(top) - view, view


def eager_calls(model, batch, **kwargs) -> dict:
    model.zero_grad(set_to_none=True)
    out = {}
    holder = {}

    def fwd():
        holder["loss"] = model(**batch, **kwargs).loss

    out["forward"], out["forward_views"] = top_level_calls(fwd)
    out["backward"], out["backward_views"] = top_level_calls(lambda: holder["loss"].backward())
    model.zero_grad(set_to_none=True)
    return out


def compiled_calls(compiled_forward, model, batch, **kwargs) -> dict:
    """Top-level calls of one compiled step (after compilation): the generated kernels (recorded by
    inductor's kernel profiling) and the aten ops the generated code calls (matrix products ...)."""
    model.zero_grad(set_to_none=True)
    holder = {}

    def fwd():
        holder["loss"] = compiled_forward(**batch, **kwargs).loss

    out = {}
    out["forward"], out["forward_views"] = top_level_calls(fwd, kernels=True)
    out["backward"], out["backward_views"] = top_level_calls(lambda: holder["loss"].backward(), kernels=True)
    model.zero_grad(set_to_none=True)
    return out


def timed_step(forward, model, optimizer, batch, **kwargs) -> float:
    start = time.perf_counter()
    forward(**batch, **kwargs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(batch: int = 16, preset: str = "base", repeats: int = 5, backend: str = "sdpa") -> dict:
    config, hf, eager = peer_and_ours(preset, backend)
    comp = LxmertForPreTraining(config).train()
    comp.load_state_dict(eager.state_dict())
    data = pretraining_batch(config, batch)
    budget = RowBudget.for_batch(batch, 20, 36)
    counts = {"ours_eager": eager_calls(eager, data, row_budget=budget), "transformers": eager_calls(hf, data)}
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # the generated C++ kernels show in the profiler
    compiled_forward = torch.compile(comp.forward, fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    compiled_forward(**data, row_budget=budget).loss.backward()  # compiles the forward and backward graphs
    comp.zero_grad(set_to_none=True)
    compile_s = time.perf_counter() - t0
    counts["ours_compiled"] = compiled_calls(compiled_forward, comp, data, row_budget=budget)
    variants = {
        "ours_eager": (eager, eager.__call__, {"row_budget": budget}),
        "ours_compiled": (comp, compiled_forward, {"row_budget": budget}),
        "transformers": (hf, hf.__call__, {}),
    }
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01)
            for name, (m, _, _) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeats + 1):  # round 0 warms up (optimizer state, caches)
        for name, (model, fwd, kw) in variants.items():
            t = timed_step(fwd, model, opts[name], data, **kw)
            if i:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "what": "pretraining step fwd+bwd+AdamW, fp32, CPU", "preset": preset, "batch": batch, "backend": backend,
        "median_s": med, "samples_per_s": {n: batch / s for n, s in med.items()},
        "compiled_vs_eager": med["ours_eager"] / med["ours_compiled"],
        "compiled_vs_transformers": med["transformers"] / med["ours_compiled"],
        "eager_vs_transformers": med["transformers"] / med["ours_eager"],
        "compile_s": compile_s, "dispatcher": counts, "times_s": times, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    args = parse_step_args(__doc__, batch=16, repeats=5)
    row = run(args.batch, args.preset, args.repeats, args.backend)
    if args.json:
        append_row(args.json, row)
    print(json.dumps(row["dispatcher"], indent=1))
    print(f"compile (first forward + backward): {row['compile_s']:.0f} s")
    print(f"{'variant':<16}{'step (s)':>10}{'samples/s':>11}")
    for name, s in row["median_s"].items():
        print(f"{name:<16}{s:>10.3f}{row['samples_per_s'][name]:>11.2f}")
    print(f"compiled / eager {row['compiled_vs_eager']:.3f}x, compiled / transformers "
          f"{row['compiled_vs_transformers']:.3f}x, eager / transformers {row['eager_vs_transformers']:.3f}x "
          f"[{args.preset}, batch {args.batch}, {args.backend}, {row['threads']} threads, commit {row['commit'][:12]}]")


if __name__ == "__main__":
    main()
