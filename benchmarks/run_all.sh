#!/usr/bin/env bash
# The whole benchmark, one command, inside a strict time budget (default 400 s; the H100 session has 15 min):
#   1. build a random checkpoint with the real architecture (SIZE=full, default) or the tiny one (SIZE=tiny)
#   2. naive HF-handler baseline, in-process, same device (before the server starts: no contention)
#   3. `bentoml serve` on 127.0.0.1:$PORT with SIGLIP_MODEL=<checkpoint> (+ any SIGLIP_* you export);
#      start-up time = launch -> /readyz 200 (model load + warm-up)
#   4. latency.py (sequential, vs the spec's table and the baseline)   5. throughput.py (concurrency sweep)
#   6. loadtest.py (2x measured capacity, then a correctness check)     the server is stopped on exit (trap)
# Results: $OUT (default /tmp/bench-out): startup/naive/latency/throughput/loadtest .json, summary.txt (every
# table), server.log -- 7 files (the GPU tool returns at most 8).
#
#   bash benchmarks/run_all.sh                      # full size, GPU if there is one
#   SIZE=tiny bash benchmarks/run_all.sh            # CPU smoke run (small durations by default)
# Knobs (env): PY, SIZE, OUT, PORT, CKPT, REBUILD=1, DEVICE (naive handler), BUDGET_S, READY_TIMEOUT,
#   NAIVE_REQUESTS (0 skips the baseline), NAIVE_WARMUP, NAIVE_MAX_S (per case), NAIVE_BUDGET_S,
#   LAT_REQUESTS, LAT_WARMUP, LAT_MAX_S (per case), LAT_BUDGET_S, TP_BUDGET_S (*_BUDGET_S: a step's limit),
#   TP_IMAGE_LEVELS, TP_ZS_LEVELS, TP_TEXT_LEVELS, TP_DURATION,
#   TP_OTHER_DURATION, CLIENT_PROCS, LOAD_DURATION (0 skips the overload test), LOAD_ARGS (extra loadtest args),
#   PROFILE_SERVER=1 (py-spy profiles of the workers during the sweep; PYSPY=path if it is not on PATH).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
SIZE=${SIZE:-full}
OUT=${OUT:-/tmp/bench-out}
PORT=${PORT:-3000}
CKPT=${CKPT:-/tmp/siglip-bench-ckpt-$SIZE}
DEVICE=${DEVICE:-auto}
BUDGET_S=${BUDGET_S:-400}
READY_TIMEOUT=${READY_TIMEOUT:-300}
if [ "$SIZE" = tiny ]; then  # smoke-run defaults
  NAIVE_REQUESTS=${NAIVE_REQUESTS:-10}; LAT_REQUESTS=${LAT_REQUESTS:-20}; LAT_WARMUP=${LAT_WARMUP:-15}
  TP_IMAGE_LEVELS=${TP_IMAGE_LEVELS:-1,4,16}; TP_ZS_LEVELS=${TP_ZS_LEVELS:-1,8}; TP_TEXT_LEVELS=${TP_TEXT_LEVELS:-1,8}
  TP_DURATION=${TP_DURATION:-2}; TP_OTHER_DURATION=${TP_OTHER_DURATION:-2}; LOAD_DURATION=${LOAD_DURATION:-5}
else
  NAIVE_REQUESTS=${NAIVE_REQUESTS:-20}; LAT_REQUESTS=${LAT_REQUESTS:-50}; LAT_WARMUP=${LAT_WARMUP:-15}
  TP_IMAGE_LEVELS=${TP_IMAGE_LEVELS:-1,8,32,128,256}; TP_ZS_LEVELS=${TP_ZS_LEVELS:-1,32,128}
  TP_TEXT_LEVELS=${TP_TEXT_LEVELS:-1,32,128}
  TP_DURATION=${TP_DURATION:-8}; TP_OTHER_DURATION=${TP_OTHER_DURATION:-6}; LOAD_DURATION=${LOAD_DURATION:-30}
fi
if [ -z "${CLIENT_PROCS:-}" ]; then
  if [ "$(nproc)" -ge 8 ]; then CLIENT_PROCS=2; else CLIENT_PROCS=1; fi
fi
LOAD_ARGS=${LOAD_ARGS:-}
URL="http://127.0.0.1:$PORT"
export BENTOML_DO_NOT_TRACK=True PYTHONUNBUFFERED=1

START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
FAILED=0
STATUS=()
SERVER_PID=""
log() { echo "[run_all $(date +%H:%M:%S) +$(($(date +%s) - START))s] $*" >&2; }

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    log "stopping the server (pid $SERVER_PID)"
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null
  fi
  SERVER_PID=""
}
trap stop_server EXIT
trap 'log "interrupted"; exit 130' INT TERM

# step NAME CAP_S CMD...: run CMD under min(CAP_S, time left), its stdout (the tables) also into summary.txt
step() {
  local name=$1 cap=$2 left t rc
  shift 2
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 10 ]; then
    log "SKIP $name: the ${BUDGET_S} s budget is spent"
    STATUS+=("$name: skipped (budget)"); FAILED=1; return 1
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  log "== $name (at most ${cap} s)"
  t=$(date +%s)
  timeout --signal=INT --kill-after=15 "$cap" "$@" | tee -a "$OUT/summary.txt"
  rc=${PIPESTATUS[0]}
  STATUS+=("$name: exit $rc, $(($(date +%s) - t)) s")
  [ "$rc" -eq 0 ] || { FAILED=1; log "$name failed (exit $rc)"; }
  return "$rc"
}

mkdir -p "$OUT"
rm -f "$OUT"/{startup,naive,latency,throughput,loadtest}.json "$OUT/summary.txt" "$OUT/server.log"
{
  echo "SigLIP 2 benchmark, SIZE=$SIZE, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs"
  "$PY" -c 'import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, GPU {gpu}")'
  env | grep '^SIGLIP_' | sort || true
} | tee -a "$OUT/summary.txt"

# 1. checkpoint
if [ -f "$CKPT/config.json" ] && [ -f "$CKPT/model.safetensors" ] && [ -z "${REBUILD:-}" ]; then
  log "reusing the checkpoint in $CKPT (REBUILD=1 to rebuild)"
else
  step checkpoint 180 "$PY" benchmarks/make_checkpoint.py "$CKPT" --size "$SIZE" || exit 1
fi

# 2. baseline, before the server takes the device (NAIVE_REQUESTS=0 skips it)
if [ "$NAIVE_REQUESTS" != 0 ]; then
  step naive "${NAIVE_BUDGET_S:-150}" "$PY" benchmarks/naive_handler.py --model "$CKPT" --device "$DEVICE" \
    --requests "$NAIVE_REQUESTS" --warmup "${NAIVE_WARMUP:-3}" --max-seconds "${NAIVE_MAX_S:-40}" --json "$OUT/naive.json"
fi

# 3. server
if ! "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', $PORT))" 2>/dev/null; then
  log "port $PORT is in use: stop what listens there or set PORT"; exit 1
fi
T0=$(date +%s.%N)
if command -v setsid >/dev/null; then
  SIGLIP_MODEL="$CKPT" setsid "$PY" -m bentoml serve --host 127.0.0.1 --port "$PORT" >"$OUT/server.log" 2>&1 &
else
  SIGLIP_MODEL="$CKPT" "$PY" -m bentoml serve --host 127.0.0.1 --port "$PORT" >"$OUT/server.log" 2>&1 &
fi
SERVER_PID=$!
log "bentoml serve started (pid $SERVER_PID), log in $OUT/server.log"
if ! step startup "$READY_TIMEOUT" "$PY" benchmarks/wait_ready.py --url "$URL" --since "$T0" --pid "$SERVER_PID" \
    --timeout "$READY_TIMEOUT" --server-log "$OUT/server.log" --json "$OUT/startup.json"; then
  tail -n 40 "$OUT/server.log" >&2
  exit 1
fi

# 4-6. against the server
BASE_ARG=()
[ -f "$OUT/naive.json" ] && BASE_ARG=(--baseline-json "$OUT/naive.json")
step latency "${LAT_BUDGET_S:-150}" "$PY" benchmarks/latency.py --url "$URL" --requests "$LAT_REQUESTS" \
  --warmup "$LAT_WARMUP" --max-seconds "${LAT_MAX_S:-40}" "${BASE_ARG[@]}" --json "$OUT/latency.json"
# While the sweep runs: GPU utilization samples (where nvidia-smi exists) and, with PROFILE_SERVER=1, py-spy
# profiles of the first model and gateway workers (busy time only): what limits the server at saturation.
WATCHERS=()
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 \
    >"$OUT/gpu-util.csv" 2>/dev/null &
  WATCHERS+=($!)
fi
if [ -n "${PROFILE_SERVER:-}" ]; then
  for svc in SiglipModel SiglipGateway; do
    wpid=$(pgrep -P "$SERVER_PID" -f -- "--service-name $svc" | head -1)
    if [ -n "$wpid" ] && command -v "${PYSPY:-py-spy}" >/dev/null 2>&1; then
      "${PYSPY:-py-spy}" record -p "$wpid" -f raw -o "$OUT/profile-$svc.txt" --nonblocking -r 200 \
        >"$OUT/profile-$svc.log" 2>&1 &
      WATCHERS+=($!)
    else
      log "PROFILE_SERVER: no $svc worker or no py-spy (${PYSPY:-py-spy}); not profiled"
    fi
  done
fi
step throughput "${TP_BUDGET_S:-240}" "$PY" benchmarks/throughput.py --url "$URL" --levels "$TP_IMAGE_LEVELS" \
  --levels-for "zero_shot=$TP_ZS_LEVELS" --levels-for "text_embedding=$TP_TEXT_LEVELS" \
  --duration "$TP_DURATION" --duration-for "zero_shot=$TP_OTHER_DURATION" \
  --duration-for "text_embedding=$TP_OTHER_DURATION" --drain-timeout 20 --client-procs "$CLIENT_PROCS" \
  --json "$OUT/throughput.json"
for w in "${WATCHERS[@]}"; do kill -INT "$w" 2>/dev/null; done
for w in "${WATCHERS[@]}"; do wait "$w" 2>/dev/null; done
if [ -s "$OUT/gpu-util.csv" ]; then
  "$PY" - "$OUT/gpu-util.csv" <<'PYEOF' | tee -a "$OUT/summary.txt"
import sys
rows = [[float(v) for v in line.split(",")[:2]] for line in open(sys.argv[1]) if line.count(",") >= 1]
util = [u for u, _ in rows]
print(f"GPU during the sweep: utilization mean {sum(util) / len(util):.0f}%, max {max(util):.0f}%; "
      f"memory max {max(m for _, m in rows):.0f} MiB ({len(rows)} samples, 4 per second)")
PYEOF
fi
for svc in SiglipModel SiglipGateway; do
  [ -s "$OUT/profile-$svc.txt" ] && "$PY" benchmarks/summarize_profile.py "$OUT/profile-$svc.txt" --top 20 \
    | tee -a "$OUT/summary.txt"
done
if [ "$LOAD_DURATION" != 0 ]; then
  TP_ARG=()
  [ -f "$OUT/throughput.json" ] && TP_ARG=(--throughput-json "$OUT/throughput.json")
  # shellcheck disable=SC2086
  step loadtest $((${LOAD_DURATION%.*} + 90)) "$PY" benchmarks/loadtest.py --url "$URL" --server-pid "$SERVER_PID" \
    --server-log "$OUT/server.log" --duration "$LOAD_DURATION" --drain-timeout 30 --client-procs "$CLIENT_PROCS" \
    "${TP_ARG[@]}" --json "$OUT/loadtest.json" $LOAD_ARGS
fi
# adaptive batch sizes, cache hits and request timings as the server saw them
"$PY" -c "import httpx, sys; sys.stdout.write(httpx.get('$URL/metrics', timeout=10).text)" >"$OUT/metrics.txt" 2>/dev/null
"$PY" - "$OUT/metrics.txt" <<'PYEOF' | tee -a "$OUT/summary.txt"
import re, sys
sums, counts = {}, {}
for line in open(sys.argv[1]):
    m = re.match(r'bentoml_service_adaptive_batch_size_(sum|count)\{.*method_name="(\w+)"', line)
    if m:
        (sums if m.group(1) == "sum" else counts)[m.group(2)] = float(line.rsplit(" ", 1)[1])
for name in sorted(counts):
    if counts[name]:
        print(f"adaptive batching {name}: {int(counts[name])} batches, mean size {sums[name] / counts[name]:.1f}")
PYEOF
stop_server

echo
echo "=================================== SUMMARY ($OUT) ==================================="
cat "$OUT/summary.txt"
echo
printf '%s\n' "${STATUS[@]}"
echo "total $(($(date +%s) - START)) s (budget $BUDGET_S s); results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$FAILED"
