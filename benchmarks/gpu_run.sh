#!/usr/bin/env bash
# The H100 session in one command (about 8.5 minutes of a 15-minute device budget): the current defaults against
# the naive baseline in the same run, then the two opt-in throughput knobs, on the same card:
#   A. defaults (nvJPEG decode next to the model, gateway coalescing): naive baseline, latency, full sweep
#   P. profile_request.py --cuda-graphs: every stage of one request in-process, eager and graph-replayed
#   G. SIGLIP_CUDA_GRAPHS=1: latency + sweep
#   W. SIGLIP_CUDA_GRAPHS=1 SIGLIP_MODEL_WORKERS=2 (two model processes on the one GPU): latency + sweep
#   C. only with GPU_RUN_COMPILE=1 (about 5 more minutes): SIGLIP_COMPILE=1 SIGLIP_CUDA_GRAPHS=1
#   F. family_cost.py on the GPU: per image and per text at model level for base-224, base-512, so400m-384 and
#      NaFlex base at 256 and 1024 patches (random weights, real architectures; at most 3.3 minutes, SIZE=full only)
#   R. siglip-index build --engine ray against --engine local on the same 2,000 JPEGs (800x600): images/s per GPU
#      through Ray Data (decode tasks on the 16 CPUs, one GPU actor) next to the tower alone (P, F); only when
#      ray[data], pylance and lancedb import (pip install '.[scale]'; the wheels exceed what a run may carry)
# Each sweep also samples GPU utilization and, when py-spy was carried in .whl, profiles the model and gateway
# workers (what limits the server at saturation). Results in $OUT: gpu.txt, A.log, profile.log, G.log, W.log
# F.log (all tables) and results.tgz (JSON, metrics, profiles, logs).
#
#   bash benchmarks/gpu_run.sh      # on the GPU host (see benchmarks/README.md for the wheels to carry)
#   SIZE=tiny BUDGET_SCALE=0.5 bash benchmarks/gpu_run.sh     # a CPU rehearsal of the whole script
set -u
cd "$(dirname "$0")/.."
OUT_ROOT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT_ROOT"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PY SIZE=${SIZE:-full}
export SIGLIP_GATEWAY_WORKERS=${SIGLIP_GATEWAY_WORKERS:-8} SIGLIP_DECODE_THREADS=${SIGLIP_DECODE_THREADS:-2}
CKPT=${CKPT:-/tmp/siglip-bench-ckpt-$SIZE}
export CKPT
# py-spy profiles of the model and gateway workers during each sweep, when its wheel was carried (.whl).
for spy in "${PYSPY:-}" /tmp/site/bin/py-spy "$(command -v py-spy 2>/dev/null)"; do
  if [ -n "$spy" ] && [ -x "$spy" ]; then export PROFILE_SERVER=1 PYSPY=$spy; break; fi
done
SCALE=${BUDGET_SCALE:-1}
budget() { awk -v s="$SCALE" -v b="$1" 'BEGIN { printf "%d", s * b }'; }
{ date -u +%Y-%m-%dT%H:%M:%SZ; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  nproc; } | tee "$OUT_ROOT/gpu.txt"

short=(LOAD_DURATION=0 NAIVE_REQUESTS=0 LAT_REQUESTS=${LAT_REQUESTS:-40} TP_DURATION=${TP_DURATION:-6}
       TP_OTHER_DURATION=5 TP_ZS_LEVELS=32 TP_TEXT_LEVELS=32)
env "${short[@]}" NAIVE_REQUESTS=${NAIVE_REQUESTS:-20} OUT=/tmp/bench-A PORT=3000 TP_IMAGE_LEVELS=1,32,128,256 \
  BUDGET_S="$(budget 170)" bash benchmarks/run_all.sh >"$OUT_ROOT/A.log" 2>&1
echo "A exit $?" | tee -a "$OUT_ROOT/gpu.txt"

mkdir -p /tmp/bench-P
timeout "$(budget 80)" "$PY" benchmarks/profile_request.py --model "$CKPT" --cuda-graphs \
  --json /tmp/bench-P/profile.json >"$OUT_ROOT/profile.log" 2>&1
echo "profile exit $?" | tee -a "$OUT_ROOT/gpu.txt"

env "${short[@]}" SIGLIP_CUDA_GRAPHS=1 OUT=/tmp/bench-G PORT=3001 TP_IMAGE_LEVELS=1,32,128,256 \
  BUDGET_S="$(budget 100)" bash benchmarks/run_all.sh >"$OUT_ROOT/G.log" 2>&1
echo "G exit $?" | tee -a "$OUT_ROOT/gpu.txt"
env "${short[@]}" SIGLIP_CUDA_GRAPHS=1 SIGLIP_MODEL_WORKERS=2 OUT=/tmp/bench-W PORT=3002 TP_IMAGE_LEVELS=32,128,256 \
  TP_ZS_LEVELS=32 TP_TEXT_LEVELS=1 BUDGET_S="$(budget 90)" bash benchmarks/run_all.sh >"$OUT_ROOT/W.log" 2>&1
echo "W exit $?" | tee -a "$OUT_ROOT/gpu.txt"

RUNS="A G W"
if [ -n "${GPU_RUN_COMPILE:-}" ]; then  # optional: compiled kernels captured in graphs (start-up ~1.5-3 min)
  env "${short[@]}" SIGLIP_COMPILE=1 SIGLIP_CUDA_GRAPHS=1 OUT=/tmp/bench-C PORT=3003 TP_IMAGE_LEVELS=32,128,256 \
    TP_ZS_LEVELS=32 TP_TEXT_LEVELS=1 READY_TIMEOUT=240 BUDGET_S="$(budget 330)" bash benchmarks/run_all.sh \
    >"$OUT_ROOT/C.log" 2>&1
  echo "C exit $?" | tee -a "$OUT_ROOT/gpu.txt"
  RUNS="A G W C"
fi

mkdir -p /tmp/bench-F
if [ "$SIZE" = full ]; then
  timeout "$(budget 200)" "$PY" benchmarks/family_cost.py --root /tmp/family-ckpts --device cuda --calls 10 \
    --json /tmp/bench-F/family.json >"$OUT_ROOT/F.log" 2>&1
  echo "family exit $?" | tee -a "$OUT_ROOT/gpu.txt"
else
  echo "family: skipped (SIZE=$SIZE; the members are real architectures)" | tee -a "$OUT_ROOT/gpu.txt"
fi

mkdir -p /tmp/bench-R
# Ray's own start-up asks cloud metadata addresses about accelerators: in a namespace of its own where we can
# (root); the GPU host reaches nothing outside itself anyway.
ISOLATE=--no-isolate
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then ISOLATE=; fi
if "$PY" -c "import ray.data, lance, lancedb" 2>/dev/null; then
  SIGLIP_MODEL=$CKPT timeout "$(budget 150)" "$PY" benchmarks/index_rate.py --engines local,ray \
    --count "${RAY_COUNT:-2000}" --batch-size 128 --ray-args "--actors 1 --decode-cpus 1" $ISOLATE \
    --images /tmp/bench-R/images --label "$SIZE" --json /tmp/bench-R/index.json >"$OUT_ROOT/R.log" 2>&1
  echo "ray exit $?" | tee -a "$OUT_ROOT/gpu.txt"
else
  echo "ray: skipped (ray[data], pylance or lancedb not importable: pip install '.[scale]')" | tee -a "$OUT_ROOT/gpu.txt"
fi

tar czf "$OUT_ROOT/results.tgz" -C /tmp bench-A bench-P bench-G bench-W bench-F bench-R $([ -d /tmp/bench-C ] && echo bench-C) 2>/dev/null
sed -n '/where the time/,$p' "$OUT_ROOT/profile.log"
[ -s "$OUT_ROOT/F.log" ] && grep -E "tokens" "$OUT_ROOT/F.log"
[ -s "$OUT_ROOT/R.log" ] && sed -n '/siglip-index build/,$p' "$OUT_ROOT/R.log"
for run in $RUNS; do
  echo "=============================== $run ==============================="
  grep -h "GPU during the sweep" "$OUT_ROOT/$run.log" | head -1
  grep -h "CUDA graph\|CUDA_GRAPHS\|Loaded " "/tmp/bench-$run/server.log" 2>/dev/null |
    head -4 | cut -c1-220
  sed -n '/=== SUMMARY/,$p' "$OUT_ROOT/$run.log" |
    grep -E "SIGLIP_|^ *(case|single|batch10|zero_shot|conc|[0-9]+ ) |^ *[0-9.]+ +(cpu|cuda)|throughput|adaptive|ready|naive|exit|total" |
    cut -c1-160
  for svc in SiglipModel SiglipGateway; do
    [ -s "/tmp/bench-$run/profile-$svc.txt" ] &&
      "$PY" benchmarks/summarize_profile.py "/tmp/bench-$run/profile-$svc.txt" --top 12 | grep -v "^---" | cut -c1-150
  done
done
