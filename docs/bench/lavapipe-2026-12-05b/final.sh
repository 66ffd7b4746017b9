#!/usr/bin/env bash
# Last check of the session (after the 16-row tail split): the issue-19 items and the
# batch-32 image encode with their PyTorch/numpy peers, then a generation step and its peer.
# Usage: BIN=/abs/vqclip PY=/abs/python docs/bench/lavapipe-2026-12-05b/final.sh
set -u
cd "$(dirname "$0")/../../.."
export VQCLIP_TUNING_FILE=""
OUT=docs/bench/lavapipe-2026-12-05b
echo "=== bench all with peers $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf /tmp/q-final
"$BIN" bench all --report /tmp/q-final --seconds 3 --only "matmul 1024x1024x1024" \
  --only "image encode ViT-B/32 x1" --only "text encode ViT-B/32 x1" \
  --only "image encode ViT-B/32 x32" >/dev/null 2>&1
$PY tools/peer_bench_all.py --report /tmp/q-final/report.json --out /tmp/q-final/peer.json --device cpu --seconds 3 >/dev/null 2>&1
"$BIN" bench all --report /tmp/q-final --merge-peer /tmp/q-final/peer.json 2>&1 | grep "^|"
mkdir -p "$OUT/final" && cp /tmp/q-final/report.md /tmp/q-final/report.json /tmp/q-final/peer.json "$OUT/final/"
echo "=== generation step $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN" bench generate --size 128x128 --cutn 4 --steps 3 2>&1 | grep -E "ms/step|memory"
$PY tools/peer_generate_step.py --size 128x128 --cutn 4 --steps 3 --device cpu 2>&1 | tail -3
echo "=== done $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
