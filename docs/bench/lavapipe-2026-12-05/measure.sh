#!/usr/bin/env bash
# Quiet-machine A/B (2026-12-05): vqclip BEFORE (the session's start, 98237d2) and AFTER
# (main), each bench followed by its PyTorch/numpy peer; then interleaved generation rounds.
# Usage: BEFORE=/abs/vqclip-98237d2 AFTER=/abs/vqclip PY=/abs/python docs/bench/lavapipe-2026-12-05/measure.sh
set -u
cd "$(dirname "$0")/../../.."
export VQCLIP_TUNING_FILE=""
OUT=docs/bench/lavapipe-2026-12-05
for tag in after before; do
  if [ $tag = after ]; then BIN=$AFTER; else BIN=$BEFORE; fi
  echo "=== $tag $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  SIZES="" VQ_SIZES=128 GEN_SIZES=128 GEN_CUTN=4 GEN_STEPS=3 VQ_REPEATS=3 \
    PY=$PY scripts/gpu-check.sh "$BIN" "$OUT/check-$tag.txt"
done
rm -rf /tmp/q-after
"$AFTER" bench all --report /tmp/q-after --seconds 3 --only "matmul 1024x1024x1024" \
  --only "image encode ViT-B/32 x1" --only "text encode ViT-B/32 x1" >/dev/null 2>&1
$PY tools/peer_bench_all.py --report /tmp/q-after/report.json --out /tmp/q-after/peer.json --device cpu --seconds 3 >/dev/null 2>&1
"$AFTER" bench all --report /tmp/q-after --merge-peer /tmp/q-after/peer.json 2>&1 | grep "^|"
mkdir -p "$OUT/all-after" && cp /tmp/q-after/report.md /tmp/q-after/report.json /tmp/q-after/peer.json "$OUT/all-after/"
echo "=== numpy $(date -u +%H:%M:%S)"
$PY tools/peer_numpy_matmul.py --size 1024
echo "=== rounds $(date -u +%H:%M:%S)"
for r in 1 2; do
  for tag in before after; do
    if [ $tag = after ]; then BIN=$AFTER; else BIN=$BEFORE; fi
    echo "--- round $r $tag $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$BIN" bench generate --size 128x128 --cutn 4 --steps 3 2>&1 | grep -E "ms/step|memory"
    "$BIN" bench vqgan --size 128x128 2>&1 | grep -E "decode"
  done
  echo "--- round $r PyTorch step"
  $PY tools/peer_generate_step.py --size 128x128 --cutn 4 --steps 3 --device cpu 2>&1 | tail -3
done
echo "=== done $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
