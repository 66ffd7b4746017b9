#!/usr/bin/env bash
# Quiet-machine A/B: vqclip BEFORE and AFTER (binaries), each bench followed by its peer.
# Usage (absolute paths): BEFORE=/path/to/old/vqclip [AFTER=/path/to/new/vqclip]
#   [PY=python-with-torch] [OUT=dir] measure.sh
set -u
cd "$(dirname "$0")/../../.."
export VQCLIP_TUNING_FILE=""
PY="${PY:-python3}"
OUT="${OUT:-docs/bench/lavapipe-2026-12-04-night}"
mkdir -p "$OUT"
for tag in after before; do
  if [ $tag = after ]; then BIN="${AFTER:-target/release/vqclip}"; else BIN="${BEFORE:?set BEFORE to a vqclip binary built from c00b0c2}"; fi
  echo "=== $tag $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  SIZES=1024 VQ_SIZES=128 GEN_SIZES=128 GEN_CUTN=4 GEN_STEPS=3 VQ_REPEATS=3 SECONDS_PER_VARIANT=2 \
    PY=$PY scripts/gpu-check.sh "$BIN" "$OUT/check-$tag.txt"
  rm -rf /tmp/q-$tag
  "$BIN" bench all --report /tmp/q-$tag --seconds 3 --only "matmul 1024x1024x1024" \
    --only "image encode ViT-B/32 x1" --only "text encode ViT-B/32 x1" --only "vqgan decode f16-16384 64x64" \
    --only "group_norm+swish" --only "attention backward 4x12x50x64" --only "dispatch overhead" >/dev/null 2>&1
  $PY tools/peer_bench_all.py --report /tmp/q-$tag/report.json --out /tmp/q-$tag/peer.json --device cpu --seconds 3 >/dev/null 2>&1
  "$BIN" bench all --report /tmp/q-$tag --merge-peer /tmp/q-$tag/peer.json 2>&1 | grep "^|"
  mkdir -p "$OUT/all-$tag" && cp /tmp/q-$tag/report.md /tmp/q-$tag/report.json /tmp/q-$tag/peer.json "$OUT/all-$tag/"
done
echo "=== numpy $(date -u +%H:%M:%S)"
$PY tools/peer_numpy_matmul.py --size 1024
echo "=== done $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
