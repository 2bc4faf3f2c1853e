#!/usr/bin/env bash
# bench/gpu_check.sh: the one command for a GPU machine without network or DeepSpeed. It installs the
# carried wheels, restores the compile caches, then runs `python -m bench.run` with the GPU plan
# (the GPU part of the tests, the end-to-end variants, the kernel groups) inside a time budget, and
# packs the caches back. See bench/README.md.
#
#   bash bench/gpu_check.sh --prepare            # on the machine with network: .whl/ (DeepSpeed and the
#                                                # packages it needs) and .whl/COMMIT
#   bash bench/gpu_check.sh [--budget S] [--cache FILE] [--dry] [-- bench.run options]
#
# --cache FILE: a compile_cache.tgz of an earlier run (default .gpu_cache/compile_cache.tgz when there):
# Triton's and inductor's caches, so a rerun compiles from them. --dry (or GPU_CHECK_DRY=1): the same on a CPU
# at tiny shapes.
# What it writes under $OUT (at most 7 files): gpu_check.log, rows.jsonl, results.json, summary.md,
# gpu_tests.log, logs.tgz, compile_cache.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  ls .whl/deepspeed-*.whl >/dev/null 2>&1 || bash ../shared/device/wheels.sh || exit 1
  { git rev-parse HEAD | tr -d '\n'; git diff --quiet HEAD -- . || printf -- '-dirty'; echo; } > .whl/COMMIT
  echo "prepared: $(ls .whl | wc -l) files in .whl/ ($(du -sh .whl | cut -f1)), commit $(cat .whl/COMMIT)"
  exit 0
fi

budget=330
cache=.gpu_cache/compile_cache.tgz
dry=()
[ "${GPU_CHECK_DRY:-0}" = 1 ] && dry=(--dry)   # the same as --dry (as CI and earlier versions call it)
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --dry) dry=(--dry); shift ;;
    --) shift; break ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/lxmert_gpu_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
t0=$(date +%s)

if [ ${#dry[@]} -eq 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  timeout -k 3 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "== wheels: $(ls .whl/*.whl | wc -l) installed into /tmp/site ($(( $(date +%s) - t0 )) s)"
fi
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}

# the compile caches: restored from the archive when there is one, packed back at the end
caches=$(mktemp -d /tmp/lxmert_compile_cache.XXXXXX)
export TRITON_CACHE_DIR=$caches/triton TORCHINDUCTOR_CACHE_DIR=$caches/inductor
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
if [ -f "$cache" ]; then
  tar -xzf "$cache" -C "$caches" && echo "== compile caches: restored $(find "$caches" -type f | wc -l) files from $cache"
else
  echo "== compile caches: none to restore ($cache): every kernel and graph compiles afresh"
fi

left=$(( budget - ($(date +%s) - t0) - 10 ))
timeout -k 5 "$left" "$PY" -m bench.run --out "$OUT" --budget "$(( left - 5 ))" --world /tmp/lxmert_bench_world \
    --work "$caches.work" "${dry[@]}" "$@"
rc=$?
[ "$rc" = 124 ] && echo "gpu_check: stopped at the ${left} s limit; the rows so far are in $OUT/rows.jsonl"
tar -czf "$OUT/compile_cache.tgz" -C "$caches" . && \
  echo "== compile caches: $(find "$caches" -type f | wc -l) files, $(du -h "$OUT/compile_cache.tgz" | cut -f1) -> $OUT/compile_cache.tgz (carry it as .gpu_cache/compile_cache.tgz next time)"
rm -rf "$caches" "$caches.work"
exit "$rc"
