#!/usr/bin/env bash
# bench/gpu_check.sh: the one command a GPU session runs. Every headline figure in one try of at most
# 6 minutes of GPU-machine wall time, the wheel install included. See bench/README.md for the details.
#
# Here (the CPU machine), from the repository root, once per try:
#     bash bench/gpu_check.sh --prepare        # .whl/: DeepSpeed + hjson + pydantic wheels, .whl/COMMIT
# Then one device run (tool `run`), with carry [".whl"] and timeout_s 420:
#     bash bench/gpu_check.sh
# It installs .whl/*.whl into /tmp/site (when .whl/ is there) and puts /tmp/site, the repository and
# kernels/ on PYTHONPATH (nothing is pip-installed into the image), then runs, in this order, each part
# under its own time limit (what is left of the 360 s budget; SIGTERM, then SIGKILL 5 s later):
#   install      the wheels                                               expected  ~10 s  (limit 30 s)
#   env          versions, GPU, clocks; measured bf16 matmul rate and
#                copy bandwidth (the MFU and bandwidth ceilings)          expected  ~10 s  (limit 25 s)
#   correctness  each Triton op + the whole model (triton vs eager), base
#                shapes, bf16, heuristic launch configs, 4 processes      expected ~40 s   (limit 75 s)
#   kernels      B=64 and 256, fwd and fwd+bwd: cross pair vs 2 SDPA
#                calls, flash attention vs SDPA, LayerNorm/GELU vs torch
#                and vs a copy of the same bytes                          expected ~40 s   (limit 60 s)
#   e2e          pre-training samples/s, batch 256, bf16: transformers
#                eager and + torch.compile, ours eager and compiled
#                (default, reduce-overhead, max-autotune) in the same
#                plain loop, ours under DeepSpeed eager and compiled,
#                ours sdpa; then ours at batch 32 (one GPU's share of
#                256 on 8) eager, default, reduce-overhead; TFLOP/s and
#                MFU each                                                 expected ~150-220 s (the rest)
#   report       results.json, summary.md, the two plots, the tables     expected  ~10 s  (limit 20 s)
# The e2e workers build and compile in the background from the start of the correctness part; they are
# stopped while the kernels are timed, and each times its steps with every other worker stopped.
# Every row is appended to $OUT/rows.jsonl the moment it is measured; what did not give a figure has
# a row saying why (missing package, timeout, error). Without the wheels the two DeepSpeed variants
# run the same model in the plain loop with torch's fused AdamW, labelled so.
#
# Comes back in $OUT (7 files): gpu_check.log (everything printed), rows.jsonl, results.json,
# summary.md, throughput.png, kernel_speedups.png, logs.tgz (each process's log). The part times and
# the tables are printed last, the end-to-end table at the very end.
#
# GPU_CHECK_DRY=1: the same plumbing on CPU at tiny shapes (the test suite runs it); no install.
# GPU_CHECK_BUDGET (default 360 s), GPU_CHECK_PARTS (default env,correctness,kernels,e2e,report).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  # here, not on the device: the wheels the GPU image lacks, and the commit (the device tree has no .git)
  [ -d .whl ] && ls .whl/deepspeed-*.whl >/dev/null 2>&1 || bash ../shared/device/wheels.sh || exit 1
  { git rev-parse HEAD | tr -d '\n'; git diff --quiet HEAD -- . 2>/dev/null || printf -- '-dirty'; echo; } > .whl/COMMIT
  echo "prepared: $(ls .whl | wc -l) files in .whl/ ($(du -sh .whl | cut -f1)), commit $(cat .whl/COMMIT)"
  exit 0
fi

export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s.%N)}
OUT=${OUT:-/tmp/lxmert_gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
BUDGET=${GPU_CHECK_BUDGET:-360}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}

# 1. the wheels (DeepSpeed and the packages it needs that the image lacks)
t_install=$(date +%s.%N)
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  export GPU_CHECK_INSTALL_RC=skipped GPU_CHECK_INSTALL_NOTE="dry run: the wheels are for the GPU machine's Python 3.12"
elif ls .whl/*.whl >/dev/null 2>&1; then
  echo "== install: $(ls .whl/*.whl | wc -l) wheels into $SITE" | tee -a "$LOG"
  timeout -k 3 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl > "$OUT/.install.log" 2>&1
  rc=$?
  export GPU_CHECK_INSTALL_RC=$rc GPU_CHECK_INSTALL_NOTE="$(tail -n 2 "$OUT/.install.log" | tr '\n' ' ' | cut -c1-300)"
  cat "$OUT/.install.log" >> "$LOG"; rm -f "$OUT/.install.log"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  export GPU_CHECK_INSTALL_RC=skipped GPU_CHECK_INSTALL_NOTE="no .whl/ in the tree (bash bench/gpu_check.sh --prepare, then carry .whl): DeepSpeed is missing"
fi
export GPU_CHECK_INSTALL_S=$(awk "BEGIN{print $(date +%s.%N) - $t_install}")
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}

# 2. the parts (bench/gpu_check.py keeps every part inside what is left of the budget)
# a safety net only: the orchestrator ends its last part 3 s before the budget
left=$(awk "BEGIN{l=$BUDGET - 2 - ($(date +%s.%N) - $GPU_CHECK_T0); print (l > 10 ? int(l) : 10)}")
timeout -k 2 "$left" "$PY" -u bench/gpu_check.py --out "$OUT" --budget "$BUDGET" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "gpu_check: stopped by the outer ${left} s limit; the rows so far are in $OUT/rows.jsonl" | tee -a "$LOG"
fi
exit "$rc"
