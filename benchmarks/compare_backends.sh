#!/usr/bin/env bash
# CPU backends side by side, in one run: benchmarks/run_all.sh once per SIGLIP_BACKEND (default "torch openvino";
# the naive fp32 baseline in the first only), then compare_backends.py prints the ratios. The OpenVINO cache is
# filled before the timed runs, so their start-up is the warm-cache one (the conversion time is logged apart).
#
#   bash benchmarks/compare_backends.sh                       # full size; results in /tmp/bench-backends
#   SIZE=tiny bash benchmarks/compare_backends.sh             # smoke run
#   ROUNDS=2 bash benchmarks/compare_backends.sh              # torch, openvino, torch, openvino (noisy hosts)
# Knobs (env): BACKENDS, ROUNDS, OUT, SIGLIP_OPENVINO_CACHE_DIR, and every run_all.sh knob (defaults here:
#   LOAD_DURATION=0, TP_IMAGE_LEVELS=1,4, TP_ZS_LEVELS=4, TP_TEXT_LEVELS=4; full size: the CPU-sized limits below).
# Full size on 2 cores (AVX2 EPYC): about 30-35 minutes, plus the one-time OpenVINO conversion (80 s there) when the
# cache directory is new.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PY
SIZE=${SIZE:-full}
export SIZE
BACKENDS=${BACKENDS:-torch openvino}
ROUNDS=${ROUNDS:-1}
OUT=${OUT:-/tmp/bench-backends}
export CKPT=${CKPT:-/tmp/siglip-bench-ckpt-$SIZE}
export LOAD_DURATION=${LOAD_DURATION:-0}
export TP_IMAGE_LEVELS=${TP_IMAGE_LEVELS:-1,4} TP_ZS_LEVELS=${TP_ZS_LEVELS:-4} TP_TEXT_LEVELS=${TP_TEXT_LEVELS:-4}
# Full size on a 2-core CPU one image takes seconds (fp32: ~4-5 s), ten images most of a minute: fewer requests,
# longer windows and step limits than run_all.sh's GPU-sized defaults.
if [ "$SIZE" != tiny ]; then
  export BUDGET_S=${BUDGET_S:-2400} READY_TIMEOUT=${READY_TIMEOUT:-450}
  # Per-case limits let the ten-image case (~50 s a request) time 2 requests after its warm-up.
  export NAIVE_REQUESTS=${NAIVE_REQUESTS:-5} NAIVE_WARMUP=${NAIVE_WARMUP:-1} NAIVE_MAX_S=${NAIVE_MAX_S:-60}
  export NAIVE_BUDGET_S=${NAIVE_BUDGET_S:-600}
  export LAT_REQUESTS=${LAT_REQUESTS:-5} LAT_WARMUP=${LAT_WARMUP:-1} LAT_MAX_S=${LAT_MAX_S:-60}
  export LAT_BUDGET_S=${LAT_BUDGET_S:-720}
  export TP_DURATION=${TP_DURATION:-45} TP_OTHER_DURATION=${TP_OTHER_DURATION:-30} TP_BUDGET_S=${TP_BUDGET_S:-600}
fi
export SIGLIP_OPENVINO_CACHE_DIR=${SIGLIP_OPENVINO_CACHE_DIR:-$OUT/openvino-cache}
export BENTOML_DO_NOT_TRACK=True PYTHONUNBUFFERED=1
log() { echo "[compare_backends $(date +%H:%M:%S)] $*" >&2; }
mkdir -p "$OUT"
FAILED=0

if [ ! -f "$CKPT/config.json" ]; then
  "$PY" benchmarks/make_checkpoint.py "$CKPT" --size "$SIZE" || exit 1
fi
if [[ " $BACKENDS " == *" openvino "* ]]; then
  log "filling the OpenVINO cache in $SIGLIP_OPENVINO_CACHE_DIR (converts once per checkpoint and versions)"
  "$PY" - <<'PYEOF' || FAILED=1
import logging, os, sys, time
sys.path.insert(0, ".")
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from siglip.model.encoder import SiglipEncoder
from siglip.settings import Settings
t0 = time.perf_counter()
enc = SiglipEncoder(Settings(model=os.environ["CKPT"], device="cpu", backend="openvino",
                             openvino_cache_dir=os.environ["SIGLIP_OPENVINO_CACHE_DIR"]), warmup_batch_sizes=())
enc.load()
print(f"OpenVINO cache ready: backend {enc.info.backend if enc.info else enc.error}, {time.perf_counter() - t0:.1f} s")
PYEOF
fi

DIRS=()
for round in $(seq "$ROUNDS"); do
  for backend in $BACKENDS; do
    dir="$OUT/round$round/$backend"
    naive=0
    [ ${#DIRS[@]} -eq 0 ] && naive=${NAIVE_REQUESTS:-10}
    mkdir -p "$OUT/round$round"
    log "round $round: SIGLIP_BACKEND=$backend -> $dir"
    SIGLIP_BACKEND=$backend OUT="$dir" NAIVE_REQUESTS=$naive bash benchmarks/run_all.sh >"$dir.log" 2>&1 || {
      FAILED=1; log "run_all.sh for $backend failed: see $dir.log"; }
    DIRS+=("$dir")
  done
  # this round's directories, first backend as the base
  "$PY" benchmarks/compare_backends.py "${DIRS[@]: -$(wc -w <<<"$BACKENDS")}" --naive "${DIRS[0]}/naive.json" \
    --json "$OUT/round$round/compare.json" \
    | tee "$OUT/round$round/compare.txt"
done
lscpu | grep 'Model name' | tee -a "$OUT/round1/compare.txt"
exit "$FAILED"
