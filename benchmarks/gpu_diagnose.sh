#!/usr/bin/env bash
# Second GPU session: where the time goes, and which serving knobs pay, on one card in one command.
#   0. profile_request.py: every stage of one request, in-process (no HTTP)
#   A. defaults (nvJPEG path, SIGLIP_MODEL_THREADS=4)      B. SIGLIP_MODEL_THREADS=1
#   C. SIGLIP_COMPILE=1 (torch.compile, dynamic shapes)
# Each: latency table + a short concurrency sweep + adaptive batch sizes from /metrics.
# Results in $OUT: gpu.txt, profile.log, A.log, B.log, C.log and results.tgz (all JSON, metrics, server logs).
set -u
cd "$(dirname "$0")/.."
OUT_ROOT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT_ROOT"
export PY=${PY:-python3} SIZE=${SIZE:-full}
export SIGLIP_GATEWAY_WORKERS=${SIGLIP_GATEWAY_WORKERS:-8} SIGLIP_DECODE_THREADS=${SIGLIP_DECODE_THREADS:-2}
CKPT=${CKPT:-/tmp/siglip-bench-ckpt-$SIZE}
{ date -u +%Y-%m-%dT%H:%M:%SZ; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  nproc; } | tee "$OUT_ROOT/gpu.txt"
[ -f "$CKPT/model.safetensors" ] || "$PY" benchmarks/make_checkpoint.py "$CKPT" --size "$SIZE" >/dev/null
mkdir -p /tmp/bench-P
timeout 120 "$PY" benchmarks/profile_request.py --model "$CKPT" --json /tmp/bench-P/profile.json \
  >"$OUT_ROOT/profile.log" 2>&1
echo "profile exit $?" | tee -a "$OUT_ROOT/gpu.txt"

common=(NAIVE_REQUESTS=0 LOAD_DURATION=0 LAT_REQUESTS=${LAT_REQUESTS:-40} TP_DURATION=${TP_DURATION:-6}
        TP_OTHER_DURATION=5 TP_ZS_LEVELS=32 TP_TEXT_LEVELS=32)
env "${common[@]}" OUT=/tmp/bench-A PORT=3000 TP_IMAGE_LEVELS=1,32,128 BUDGET_S=${BUDGET_A:-110} \
  bash benchmarks/run_all.sh >"$OUT_ROOT/A.log" 2>&1
echo "A exit $?" | tee -a "$OUT_ROOT/gpu.txt"
env "${common[@]}" OUT=/tmp/bench-B PORT=3001 TP_IMAGE_LEVELS=32 SIGLIP_MODEL_THREADS=1 BUDGET_S=${BUDGET_B:-75} \
  bash benchmarks/run_all.sh >"$OUT_ROOT/B.log" 2>&1
echo "B exit $?" | tee -a "$OUT_ROOT/gpu.txt"
env "${common[@]}" OUT=/tmp/bench-C PORT=3002 TP_IMAGE_LEVELS=1,32,128 SIGLIP_COMPILE=1 BUDGET_S=${BUDGET_C:-150} \
  READY_TIMEOUT=120 bash benchmarks/run_all.sh >"$OUT_ROOT/C.log" 2>&1
echo "C exit $?" | tee -a "$OUT_ROOT/gpu.txt"
tar czf "$OUT_ROOT/results.tgz" -C /tmp bench-P bench-A bench-B bench-C 2>/dev/null
sed -n '/where the time/,$p' "$OUT_ROOT/profile.log"
for run in A B C; do
  echo "=============================== $run ==============================="
  sed -n '/=== SUMMARY/,$p' "$OUT_ROOT/$run.log" | grep -E "SIGLIP_|^ *(case|single|batch10|zero_shot|conc|[0-9]+ ) |throughput:|adaptive|ready s|cuda|exit|total" | cut -c1-150
done
