#!/usr/bin/env bash
# GPU check for a machine with a GPU and no network: runs a prebuilt vqclip release binary
# (no cargo, no downloads) and records the device report, square matmul benchmarks and
# VQGAN+CLIP generation steps (random-weight ViT-B/32 + f16-16384, cutn 32).
#
#   scripts/gpu-check.sh [BINARY] [RESULTS]
#     BINARY   default ./target/release/vqclip
#     RESULTS  default gpu-check-results.txt (written whole at the end; no partial file)
#   Environment: SIZES (default "512 1024 2048 4096"), SECONDS_PER_VARIANT (default 2),
#   GEN_SIZES (default "256 512"), GEN_CUTN (default 32), GEN_STEPS (default 3),
#   TIMEOUT per command in seconds (default 300), and vqclip's own VQCLIP_BACKEND /
#   VQCLIP_ADAPTER to pick the device.
#
# Every matmul benchmark checks the GPU result against an f64 CPU reference before it
# reports a speed, so a wrong kernel shows up as a failed run, not as a fast one. The
# generation bench fails if its warm-up step's loss is not finite.
set -uo pipefail

BIN="${1:-./target/release/vqclip}"
OUT="${2:-gpu-check-results.txt}"
SIZES="${SIZES:-512 1024 2048 4096}"
SECS="${SECONDS_PER_VARIANT:-2}"
GEN_SIZES="${GEN_SIZES:-256 512}"
GEN_CUTN="${GEN_CUTN:-32}"
GEN_STEPS="${GEN_STEPS:-3}"
TIMEOUT="${TIMEOUT:-300}"

if [ ! -x "$BIN" ]; then
    echo "gpu-check: $BIN is not an executable file (build it elsewhere with" \
         "'cargo build --release' and copy target/release/vqclip here)" >&2
    exit 2
fi
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/vqclip-runtime-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi

TMP="$(mktemp "${OUT}.XXXXXX.tmp")" || exit 2
trap 'rm -f "$TMP"' EXIT
failures=0
summary=""

section() { printf '\n===== %s =====\n' "$1" >>"$TMP"; }

# Runs a command with a time limit, appending its stdout and stderr to the results.
record() {
    local rc
    timeout "$TIMEOUT" "$@" >>"$TMP" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        printf '[exit status %d%s]\n' "$rc" "$([ $rc -eq 124 ] && echo ', timed out')" >>"$TMP"
    fi
    return $rc
}

section "host"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "kernel: $(uname -srm)"
    echo "binary: $BIN"
    echo "version: $("$BIN" --version 2>&1 | head -n 1)"
    grep -m1 'model name' /proc/cpuinfo 2>/dev/null
    echo "cpus: $(nproc 2>/dev/null)"
} >>"$TMP" 2>&1
if command -v nvidia-smi >/dev/null 2>&1; then
    section "nvidia-smi"
    record nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv
fi

section "vqclip info --json"
if ! record "$BIN" info --json; then
    failures=$((failures + 1))
    summary+="info: FAILED (see $OUT)"$'\n'
fi

for n in $SIZES; do
    section "vqclip bench matmul --size $n --json"
    start=$(wc -c <"$TMP")
    if record "$BIN" bench matmul --size "$n" --seconds "$SECS" --json; then
        part="$(tail -c +"$((start + 1))" "$TMP")"
        best="$(printf '%s\n' "$part" | grep -m1 '"best"' | sed 's/.*: *"\(.*\)".*/\1/')"
        gf="$(printf '%s\n' "$part" | grep -m1 '"gflops"' | sed 's/.*: *\([0-9.eE+-]*\).*/\1/')"
        adapter="$(printf '%s\n' "$part" | grep -m1 '"adapter"' | sed 's/.*: *"\(.*\)".*/\1/')"
        line="$(printf 'matmul %5s: %10.1f GFLOP/s  best %-12s on %s' "$n" "$gf" "$best" "$adapter")"
    else
        failures=$((failures + 1))
        line="matmul $n: FAILED (see $OUT)"
    fi
    summary+="$line"$'\n'
done

for n in $GEN_SIZES; do
    section "vqclip bench generate --size ${n}x$n --cutn $GEN_CUTN --steps $GEN_STEPS --json"
    start=$(wc -c <"$TMP")
    if record "$BIN" bench generate --size "${n}x$n" --cutn "$GEN_CUTN" --steps "$GEN_STEPS" \
        --json; then
        part="$(tail -c +"$((start + 1))" "$TMP")"
        ms="$(printf '%s\n' "$part" | grep -m1 '"mean_ms"' | sed 's/.*: *\([0-9.eE+-]*\).*/\1/')"
        peak="$(printf '%s\n' "$part" | grep -m1 '"peak_bytes"' | sed 's/.*: *\([0-9]*\).*/\1/')"
        line="$(printf 'generate %4sx%-4s cutn %s: %9.1f ms/step  peak %6.0f MiB' \
            "$n" "$n" "$GEN_CUTN" "$ms" "$(awk "BEGIN{print ${peak:-0}/1048576}")")"
    else
        failures=$((failures + 1))
        line="generate ${n}x$n: FAILED (see $OUT)"
    fi
    summary+="$line"$'\n'
done

section "summary"
printf '%s' "$summary" >>"$TMP"
echo "failures: $failures" >>"$TMP"
mv "$TMP" "$OUT"
trap - EXIT

printf '%s' "$summary"
echo "results written to $OUT ($failures failures)"
[ "$failures" -eq 0 ]
