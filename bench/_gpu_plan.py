"""What bench/gpu_check.sh measures: its parts, their time limits, and every row each part owes.

Stdlib only: the orchestrator (bench/gpu_check.py) reads this without importing torch, and
checks at the end of each part that every row listed here exists; a missing one becomes a
"no figure" row that says why (timeout, error, budget), never silence.

A "dry" plan is the same plumbing at tiny shapes on CPU (GPU_CHECK_DRY=1; the test suite runs it).
"""
from __future__ import annotations

PARTS = ("env", "correctness", "kernels", "e2e", "report")

# Seconds. cap: the part's own time limit. reserve: what each later part is guaranteed when an earlier
# one starts (an earlier part's limit is cut so that the later ones keep their reserve). GRACE_S: between
# SIGTERM and SIGKILL of a part's processes, counted in the budget. Worst case on the GPU: install
# (30 + 3) + every part at its limit + grace stays inside the 360 s budget (bench/gpu_check.py
# computes each limit from what is left).
BUDGET_S = 360
GRACE_S = 5
INSTALL_LIMIT_S = 30
CAPS = {"env": 25, "correctness": 75, "kernels": 60, "e2e": 240, "report": 20}
RESERVE = {"env": 10, "correctness": 25, "kernels": 25, "e2e": 90, "report": 15}
# the dry run on 2 shared CPU cores: the same structure, looser caps (the test asserts its wall time)
DRY_BUDGET_S = 600
DRY_CAPS = {"env": 60, "correctness": 150, "kernels": 120, "e2e": 300, "report": 60}

# ---------------------------------------------------------------------------------------------- env
ENV_KEYS = ("env:install", "env:versions", "env:gpu", "env:peak_matmul", "env:copy_bandwidth")

# ---------------------------------------------------------------------------------------------- correctness
# worker name -> the checks it runs (each check: one row; every output and gradient compared)
CORRECTNESS = {
    "attention": ("flash_attention L20 masked", "flash_attention L36", "flash_attention dropout",
                  "flash_attention_qkv L20 masked"),
    "cross": ("cross_pair 20+36 masked", "cross_pair dropout"),
    "elementwise": ("layer_norm+residual", "layer_norm dropout", "bias_gelu"),
    "model": ("model triton vs eager bf16",),
}


def correctness_keys() -> list[str]:
    return [f"correctness:{c}" for checks in CORRECTNESS.values() for c in checks]


# ---------------------------------------------------------------------------------------------- kernels
KERNEL_BATCHES = (64, 256)
DRY_KERNEL_BATCHES = (2,)
KERNEL_MODES = ("fwd", "fwd+bwd")


def kernel_groups(dry: bool) -> list[str]:
    """One key per (op, batch, mode): bench_kernels.py writes a row per implementation into each."""
    out = []
    for b in DRY_KERNEL_BATCHES if dry else KERNEL_BATCHES:
        for mode in KERNEL_MODES:
            out += [f"kernels:cross_pair B{b} {mode}", f"kernels:self_attention L20 B{b} {mode}",
                    f"kernels:self_attention L36 B{b} {mode}", f"kernels:layer_norm+residual B{b} {mode}",
                    f"kernels:bias_gelu B{b} {mode}"]
    return out


# ---------------------------------------------------------------------------------------------- e2e
# Timing priority = this order (the coordinator grants the device to the waiting worker listed first).
# loop "plain": the peer's loop (autocast bf16, torch.optim.AdamW as the peer, gradient clipping) for
# transformers' model and ours alike: the model against the model. loop "deepspeed": the recipe's
# engine (ds_configs/zero2.json: ZeRO-2, bf16, with torch's fused AdamW) when deepspeed imports, else
# the same model in the plain loop with torch's fused AdamW, labelled so. compile: a torch.compile
# mode (ours: fullgraph, as `--compile`), or None for eager. batch: this variant's batch (one micro-batch)
# instead of the part's 256.
E2E_VARIANTS = (
    {"key": "hf", "model": "hf", "loop": "plain", "compile": None,
     "note": "transformers LxmertForPreTraining, autocast bf16, torch AdamW (the peer)"},
    {"key": "ours", "model": "ours", "loop": "plain", "compile": None},
    {"key": "hf+compile", "model": "hf", "loop": "plain", "compile": "default",
     "note": "torch.compile(transformers model), graph breaks allowed"},
    {"key": "ours+compile default", "model": "ours", "loop": "plain", "compile": "default"},
    {"key": "ours | DeepSpeed", "model": "ours", "loop": "deepspeed", "compile": None},
    {"key": "ours+compile default | DeepSpeed", "model": "ours", "loop": "deepspeed", "compile": "default",
     "note": "the recipe's step: pretrain.py --compile default under DeepSpeed"},
    {"key": "ours+compile reduce-overhead", "model": "ours", "loop": "plain", "compile": "reduce-overhead"},
    {"key": "ours+compile max-autotune", "model": "ours", "loop": "plain", "compile": "max-autotune"},
    {"key": "ours sdpa", "model": "ours", "loop": "plain", "backend": "sdpa", "compile": None,
     "note": "torch SDPA attention and torch LayerNorm/GELU instead of the Triton kernels"},
    # batch 32: one GPU's share of the paper's 256 on 8 GPUs, where launching, not the math, bounds a step
    {"key": "ours, batch 32", "model": "ours", "loop": "plain", "compile": None, "batch": 32},
    {"key": "ours+compile default, batch 32", "model": "ours", "loop": "plain", "compile": "default", "batch": 32},
    {"key": "ours+compile reduce-overhead, batch 32", "model": "ours", "loop": "plain", "compile": "reduce-overhead",
     "batch": 32},
)
# the dry run's stand-in for a variant's own batch (the tiny preset runs batch 4 otherwise)
DRY_VARIANT_BATCH = 2
# workers building at the same time (GPU memory: each holds its model and optimizer; CPU: compiles)
E2E_CONCURRENT = 9
DRY_E2E_CONCURRENT = 3


def own_batch(variant_key) -> int | None:
    """The batch of an end-to-end variant that has its own (None: the part's batch)."""
    return next((v.get("batch") for v in E2E_VARIANTS if v["key"] == variant_key), None)


def e2e_keys() -> list[str]:
    return [f"e2e:{v['key']}" for v in E2E_VARIANTS]


def expected_keys(part: str, dry: bool) -> list[str]:
    if part == "env":
        return list(ENV_KEYS)
    if part == "correctness":
        return correctness_keys()
    if part == "kernels":
        return kernel_groups(dry)
    if part == "e2e":
        return e2e_keys()
    return []
