#!/usr/bin/env bash
# Debian 12's lavapipe (Mesa 22.3.6, LLVM 15) against trixie-backports' (Mesa 26.1.6,
# LLVM 19, downloaded by scripts/coop-lavapipe.sh into target/mesa-trixie and run through
# that tree's loader), with the PyTorch/numpy peer right after, in two rounds; then one
# generation step on each driver and its PyTorch peer. The reports' % of peak use the f32
# FMA microkernel of 77ae0eb (2 chains written out); numpy's 1024² matmul runs after the
# PyTorch peer.
# Usage: BIN=/abs/vqclip PY=/abs/python docs/bench/lavapipe-2026-12-05c/mesa.sh
set -u
cd "$(dirname "$0")/../../.."
export VQCLIP_TUNING_FILE=""
OUT=docs/bench/lavapipe-2026-12-05c
T="$PWD/target/mesa-trixie/root"
L="$T/usr/lib/x86_64-linux-gnu"
new() {
  VK_DRIVER_FILES="$T/usr/share/vulkan/icd.d/lvp_icd.json" "$L/ld-linux-x86-64.so.2" --library-path "$L" "$BIN" "$@"
}
old() {
  "$BIN" "$@"
}
ITEMS=(--only "matmul 1024x1024x1024" --only "image encode ViT-B/32 x1" --only "text encode ViT-B/32 x1")
for round in 1 2; do
  for d in old new; do
    echo "=== round $round mesa-$d $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    rm -rf "/tmp/mesa-$d"
    $d bench all --report "/tmp/mesa-$d" --seconds 3 "${ITEMS[@]}" >/dev/null 2>&1
    grep -m1 "^- adapter" "/tmp/mesa-$d/report.md"
  done
  echo "=== round $round peer $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  $PY tools/peer_bench_all.py --report /tmp/mesa-old/report.json --out /tmp/mesa-peer.json --device cpu --seconds 3 >/dev/null 2>&1
  $PY tools/peer_numpy_matmul.py --size 1024
  for d in old new; do
    echo "--- mesa-$d with the peer"
    $d bench all --report "/tmp/mesa-$d" --merge-peer /tmp/mesa-peer.json 2>&1 | grep "^|"
    mkdir -p "$OUT/round$round-$d" && cp "/tmp/mesa-$d/report.md" "/tmp/mesa-$d/report.json" /tmp/mesa-peer.json "$OUT/round$round-$d/"
  done
done
for d in old new; do
  echo "=== generation step mesa-$d $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  $d bench generate --size 128x128 --cutn 4 --steps 3 2>&1 | grep -E "ms/step|memory"
done
echo "=== generation step peer $(date -u +%H:%M:%S)"
$PY tools/peer_generate_step.py --size 128x128 --cutn 4 --steps 3 --device cpu 2>&1 | tail -3
echo "=== done $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
