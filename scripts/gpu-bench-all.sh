#!/usr/bin/env bash
# Cross-vendor benchmark run for a machine with a GPU (no network needed): runs a prebuilt
# vqclip release binary's `info`, `bench peak` and `bench all`, then the PyTorch peer of the
# same item list right after (tools/peer_bench_all.py, CUDA when torch sees a GPU, else CPU),
# and merges the peer's figures into the report.
#
#   scripts/gpu-bench-all.sh [BINARY] [DIR]
#     BINARY   default ./target/release/vqclip
#     DIR      default $OUT/bench-all if $OUT is set, else ./bench-all-results; gets
#              info.json, peak.json, report.json, report.md, roofline.svg, peer.json, log.txt
#   Environment: QUICK=1 for the short list (what lavapipe runs in minutes), SECONDS_PER_ITEM
#   (default 1), PYTHON (default python3; the peer is skipped, and says so, without torch),
#   PEER_DEVICE (cuda or cpu; default: cuda if torch sees one), TIMEOUT per command in
#   seconds (default 900), and vqclip's VQCLIP_BACKEND / VQCLIP_ADAPTER.
#
# The matmul variants are retimed per shape class (--tune) so that the run uses this
# adapter's winners. The exit status is non-zero if any step failed; the files of the steps
# that ran stay (each is written whole).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-./target/release/vqclip}"
DEFAULT_DIR="./bench-all-results"
[ -n "${OUT:-}" ] && DEFAULT_DIR="$OUT/bench-all"
DIR="${2:-$DEFAULT_DIR}"
SECS="${SECONDS_PER_ITEM:-1}"
PY="${PYTHON:-python3}"
TIMEOUT="${TIMEOUT:-900}"
QUICK_FLAG=""
[ "${QUICK:-0}" = "1" ] && QUICK_FLAG="--quick"

if [ ! -x "$BIN" ]; then
    echo "gpu-bench-all: $BIN is not an executable file (build it with" \
         "'cargo build --release')" >&2
    exit 2
fi
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/vqclip-runtime-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
mkdir -p "$DIR" || exit 2
LOG="$DIR/log.txt"
: >"$LOG"
failures=0

# Runs a command under the time limit; stderr goes to the log, stdout to $1 ("-": the log).
step() {
    local out="$1" rc
    shift
    echo "+ $*" >>"$LOG"
    if [ "$out" = "-" ]; then
        timeout "$TIMEOUT" "$@" >>"$LOG" 2>&1
    else
        timeout "$TIMEOUT" "$@" >"$out.tmp" 2>>"$LOG" && mv "$out.tmp" "$out"
    fi
    rc=$?
    [ "$out" = "-" ] || rm -f -- "$out.tmp"
    if [ $rc -ne 0 ]; then
        echo "[exit status $rc$([ $rc -eq 124 ] && echo ', timed out')]" >>"$LOG"
        failures=$((failures + 1))
    fi
    return $rc
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "kernel: $(uname -srm)"
    echo "binary: $BIN"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} >>"$LOG" 2>&1

step "$DIR/info.json" "$BIN" info --json
step "$DIR/peak.json" "$BIN" bench peak --json
step - "$BIN" bench all $QUICK_FLAG --tune --seconds "$SECS" --report "$DIR"

if [ -f "$DIR/report.json" ]; then
    if "$PY" -c 'import torch, transformers' >/dev/null 2>&1; then
        DEV="${PEER_DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
        step - "$PY" "$HERE/tools/peer_bench_all.py" --report "$DIR/report.json" \
            --out "$DIR/peer.json" --device "$DEV" --seconds "$SECS" &&
            step - "$BIN" bench all --report "$DIR" --merge-peer "$DIR/peer.json"
    else
        echo "peer skipped: $PY cannot import torch and transformers" | tee -a "$LOG" >&2
    fi
fi

echo "results in $DIR ($failures failed steps; see $LOG)"
[ $failures -eq 0 ]
