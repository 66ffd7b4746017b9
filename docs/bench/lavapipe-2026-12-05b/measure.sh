#!/usr/bin/env bash
# Quiet-machine check (2026-12-05, second session): f16 activations A/B, then the issue-19
# items with their PyTorch/numpy peers, then a generation step and its PyTorch peer.
# Usage: BIN=/abs/vqclip PY=/abs/python docs/bench/lavapipe-2026-12-05b/measure.sh
set -u
cd "$(dirname "$0")/../../.."
export VQCLIP_TUNING_FILE=""
OUT=docs/bench/lavapipe-2026-12-05b
echo "=== f16 activations A/B $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in 1 2 3; do
  for acts in off on; do
    VQCLIP_F16_ACTIVATIONS=$acts "$BIN" bench all --quick --seconds 3 \
      --only "encode ViT-B/32 x1" --report "/tmp/f16-$acts-$r" >/dev/null 2>&1
    python3 - "$r" "$acts" "/tmp/f16-$acts-$r/report.json" <<'PY'
import json, sys
r, acts, path = sys.argv[1:]
for it in json.load(open(path))["items"]:
    print(f"round {r} f16-activations={acts}: {it['name']}: min {it['ms_min']:.1f} ms, median {it['ms_median']:.1f} ms")
PY
  done
done
echo "=== bench all with peers $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf /tmp/q-all
"$BIN" bench all --report /tmp/q-all --seconds 3 --only "matmul 1024x1024x1024" \
  --only "image encode ViT-B/32 x1" --only "text encode ViT-B/32 x1" \
  --only "attention 32x12x50x64" >/dev/null 2>&1
$PY tools/peer_bench_all.py --report /tmp/q-all/report.json --out /tmp/q-all/peer.json --device cpu --seconds 3 >/dev/null 2>&1
"$BIN" bench all --report /tmp/q-all --merge-peer /tmp/q-all/peer.json 2>&1 | grep "^|"
mkdir -p "$OUT/all" && cp /tmp/q-all/report.md /tmp/q-all/report.json /tmp/q-all/peer.json "$OUT/all/"
echo "=== generation step $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN" bench generate --size 128x128 --cutn 4 --steps 3 2>&1 | grep -E "ms/step|memory"
$PY tools/peer_generate_step.py --size 128x128 --cutn 4 --steps 3 --device cpu 2>&1 | tail -3
echo "=== done $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
