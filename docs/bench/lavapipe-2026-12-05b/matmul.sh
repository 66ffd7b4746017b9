#!/usr/bin/env bash
# 1024² matmul against numpy (bench all's item and tools/peer_bench_all.py), two rounds,
# after the 32 x 128 subgroup tile. Usage: BIN=/abs/vqclip PY=/abs/python .../matmul.sh
set -u
cd "$(dirname "$0")/../../.."
export VQCLIP_TUNING_FILE=""
for r in 1 2; do
  echo "=== round $r $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  rm -rf /tmp/q-mm
  "$BIN" bench all --report /tmp/q-mm --seconds 3 --only "matmul 1024x1024x1024" >/dev/null 2>&1
  $PY tools/peer_bench_all.py --report /tmp/q-mm/report.json --out /tmp/q-mm/peer.json --device cpu --seconds 3 >/dev/null 2>&1
  "$BIN" bench all --report /tmp/q-mm --merge-peer /tmp/q-mm/peer.json 2>&1 | grep "^| matmul"
  $PY tools/peer_numpy_matmul.py --size 1024
done
