#!/usr/bin/env bash
# The GPU session in one command: two configurations of the service, one after the other, on the same card.
#   A. defaults: JPEGs decoded by nvJPEG next to the model (SIGLIP_DEVICE_DECODE=auto), plus the naive baseline
#      and the overload test;
#   B. SIGLIP_DEVICE_DECODE=off: every image decoded with PIL in the gateway (latency + a short sweep).
# Results in $OUT: gpu.txt, A.log, B.log (all tables) and results.tgz (every JSON and server log).
#
#   bash benchmarks/gpu_run.sh            # on the GPU host (see benchmarks/README.md for the wheels to carry)
set -u
cd "$(dirname "$0")/.."
OUT_ROOT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT_ROOT"
export PY=${PY:-python3}
export SIGLIP_GATEWAY_WORKERS=${SIGLIP_GATEWAY_WORKERS:-8} SIGLIP_DECODE_THREADS=${SIGLIP_DECODE_THREADS:-2}
{ date -u +%Y-%m-%dT%H:%M:%SZ; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  nproc; } | tee "$OUT_ROOT/gpu.txt"

OUT=/tmp/bench-A BUDGET_S=${BUDGET_A:-330} bash benchmarks/run_all.sh >"$OUT_ROOT/A.log" 2>&1
echo "A exit $?" | tee -a "$OUT_ROOT/gpu.txt"
SIGLIP_DEVICE_DECODE=off OUT=/tmp/bench-B PORT=$((${PORT:-3000} + 1)) NAIVE_REQUESTS=0 LOAD_DURATION=0 TP_IMAGE_LEVELS=${TP_B_LEVELS:-1,32,256} \
  TP_ZS_LEVELS=1,64 TP_TEXT_LEVELS=1 TP_DURATION=6 TP_OTHER_DURATION=4 BUDGET_S=${BUDGET_B:-160} \
  bash benchmarks/run_all.sh >"$OUT_ROOT/B.log" 2>&1
echo "B exit $?" | tee -a "$OUT_ROOT/gpu.txt"
tar czf "$OUT_ROOT/results.tgz" -C /tmp bench-A bench-B 2>/dev/null
for run in A B; do
  echo "=============================== $run ==============================="
  sed -n '/=== SUMMARY/,$p' "$OUT_ROOT/$run.log" | grep -v "^\[transformers\]\|Loading weights" | cut -c1-160
done
