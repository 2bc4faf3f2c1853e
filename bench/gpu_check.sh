#!/usr/bin/env bash
# The one script a GPU session runs (see ../shared/device/README.md), from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels && bash bench/gpu_check.sh
#
# 1. GPU tests: the Triton kernels in bf16 / fp16 / fp32 (kernels/tests with LXMERT_KERNELS_GPU=1),
#    and the model-level triton-vs-eager test on the base config (tests/test_bench_gpu_model.py).
# 2. The benchmark suite, one part per process with its own `timeout` (a part cut short keeps the
#    rows it wrote): peak + end-to-end (with the ablations), kernels, data; then the report.
# Everything stays under GPU_CHECK_BUDGET seconds (default 450, i.e. 7.5 minutes): each part's
# timeout is its own limit or what is left of the budget, whichever is smaller, so the parts at the
# end (ablations, kernel benchmark, data) are the ones cut short when the earlier ones run long;
# raise GPU_CHECK_BUDGET when the device time allows. Order = priority: GPU correctness, then the
# end-to-end targets (peer, ours per backend, the compiled peer last), then the rest.
# $OUT receives at most 8 files: gpu_check.log (all output), results.tgz (every row / log),
# summary.md, results.json, throughput.png, kernel_speedups.png. The table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lxmert_gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/lxmert_gpu_check.XXXX)
RES=$WORK/results
LOGS=$WORK/logs
mkdir -p "$RES" "$LOGS"
LOG=$OUT/gpu_check.log
BUDGET=${GPU_CHECK_BUDGET:-450}
export LXMERT_KERNELS_GPU=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:$PWD:$PWD/kernels
# GPU_CHECK_DRY=1: check this script's plumbing on a CPU machine (tests collected only, suite --quick)
DRY_PYTEST=() DRY_SUITE=()
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then DRY_PYTEST=(--co); DRY_SUITE=(--quick); fi
SECONDS=0
declare -a SUMMARY=()

# part NAME LIMIT_S CMD...: run CMD under `timeout min(LIMIT, budget left)`, log to $LOGS/NAME.log
part() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if (( left < 15 )); then
    SUMMARY+=("$name: skipped (budget of ${BUDGET}s spent)")
    echo "== $name: skipped, budget spent" | tee -a "$LOG"
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s, t=${SECONDS}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$LOGS/$name.log" >> "$LOG"
  local verdict="rc $rc"
  (( rc == 0 )) && verdict="ok"
  (( rc == 124 || rc == 137 )) && verdict="TIMED OUT after ${limit}s"
  local extra
  extra=$(grep -E "^[0-9]+ (passed|failed)|passed|failed|error" "$LOGS/$name.log" | tail -n 1 | cut -c1-120)
  SUMMARY+=("$name: $verdict, $((SECONDS - t0))s${extra:+ - $extra}")
  echo "== $name: $verdict ($((SECONDS - t0))s)" | tee -a "$LOG"
  return 0
}

{
  echo "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo -dirty)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -n 1
  python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -n 1
  python3 -c "import matplotlib; print('matplotlib', matplotlib.__version__)" 2>&1 | tail -n 1
  command -v nvcc || echo "nvcc: not found (DeepSpeed's FusedAdam cannot JIT-build)"
} > "$LOG" 2>&1
cat "$LOG"

# 1. tests on the GPU
part kernel_tests 80 python3 -m pytest kernels/tests -q --maxfail=5 -p no:cacheprovider "${DRY_PYTEST[@]}"
part model_tests 60 python3 -m pytest tests/test_bench_gpu_model.py -q -rs -p no:cacheprovider "${DRY_PYTEST[@]}"

# 2. the suite
part e2e 200 python3 bench/run.py --out "$RES" --parts peak,e2e --ablations off --warmup 3 --steps 10 --variant-timeout 120 "${DRY_SUITE[@]}"
part ablations 60 python3 bench/run.py --out "$RES" --parts e2e --ablations only --warmup 3 --steps 10 --variant-timeout 60 "${DRY_SUITE[@]}"
part kernels 50 python3 bench/run.py --out "$RES" --parts kernels --kernel-batches 32,128,512 "${DRY_SUITE[@]}"
part data 25 python3 bench/run.py --out "$RES" --parts data --data-workers 8 "${DRY_SUITE[@]}"
timeout 60 python3 bench/run.py --out "$RES" --report-only > "$LOGS/report.log" 2>&1
cat "$LOGS/report.log" >> "$LOG"

cp "$LOGS"/*.log "$RES"/ 2>/dev/null
tar czf "$OUT/results.tgz" -C "$WORK" results 2>/dev/null
for f in summary.md results.json throughput.png kernel_speedups.png; do
  [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"
done
{
  echo
  echo "== gpu_check: ${SECONDS}s of a ${BUDGET}s budget"
  for s in "${SUMMARY[@]}"; do echo "  $s"; done
  echo
  # the suite's table, printed last
  if grep -q '^end-to-end pre-training' "$LOGS/report.log"; then
    sed -n '/^end-to-end pre-training/,$p' "$LOGS/report.log"
  else
    echo "end-to-end pre-training: no rows (see the e2e part above and e2e.log in results.tgz)"
  fi
} | tee -a "$LOG"
rm -rf "$WORK"
