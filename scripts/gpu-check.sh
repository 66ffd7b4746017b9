#!/usr/bin/env bash
# GPU check for a machine with a GPU and no network: runs a prebuilt vqclip release binary
# (no cargo, no downloads) and records the device report, square matmul benchmarks, the
# VQGAN's stages (`bench vqgan`) and VQGAN+CLIP generation steps (random-weight ViT-B/32 +
# f16-16384, cutn 32), each vqclip bench followed at once by its PyTorch peer
# (tools/peer_vqgan_bench.py, tools/peer_generate_step.py; CUDA when torch sees a GPU, f32,
# no TF32) when a Python with torch is there, so that both see the same machine state.
#
#   scripts/gpu-check.sh [BINARY] [RESULTS]
#     BINARY   default ./target/release/vqclip
#     RESULTS  default gpu-check-results.txt (written whole at the end; no partial file)
#   Environment: SIZES (default "512 1024 2048 4096"; "" skips them), SECONDS_PER_VARIANT (default 2),
#   VQ_SIZES (default "256 512"), VQ_REPEATS (default 5), GEN_SIZES (default "256 512"),
#   GEN_CUTN (default 32), GEN_STEPS (default 3), PY (default python3; PY="" skips the
#   peers), TIMEOUT per command in seconds (default 300), and vqclip's own VQCLIP_BACKEND /
#   VQCLIP_ADAPTER to pick the device.
#
# On lavapipe, a quick check of the script itself:
#   SIZES=64 VQ_SIZES=32 GEN_SIZES=32 GEN_CUTN=1 GEN_STEPS=1 VQ_REPEATS=1 scripts/gpu-check.sh
#
# Every matmul benchmark checks the GPU result against an f64 CPU reference before it
# reports a speed, so a wrong kernel shows up as a failed run, not as a fast one. The
# generation bench fails if its warm-up step's loss is not finite.
set -uo pipefail

BIN="${1:-./target/release/vqclip}"
OUT="${2:-gpu-check-results.txt}"
SIZES="${SIZES-512 1024 2048 4096}"
SECS="${SECONDS_PER_VARIANT:-2}"
GEN_SIZES="${GEN_SIZES-256 512}"
GEN_CUTN="${GEN_CUTN:-32}"
GEN_STEPS="${GEN_STEPS:-3}"
VQ_SIZES="${VQ_SIZES-256 512}"
VQ_REPEATS="${VQ_REPEATS:-5}"
PY="${PY-python3}"
TIMEOUT="${TIMEOUT:-300}"
TOOLS="$(cd "$(dirname "$0")/../tools" 2>/dev/null && pwd)"

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

# The peers run only with a Python that has torch and the tools folder beside this script.
peer=0
if [ -n "$PY" ] && [ -n "$TOOLS" ] && "$PY" -c 'import torch' >/dev/null 2>&1; then
    peer=1
fi
json_num() { printf '%s\n' "$1" | grep -m1 "\"$2\"" | sed 's/.*: *\([0-9.eE+-]*\).*/\1/'; }
# "stage min_ms median_ms" per stage of a bench vqgan / peer JSON.
stage_rows() {
    printf '%s\n' "$1" | awk '
        /"stage"/ { gsub(/[",]/, "", $2); s = $2 }
        /"min_ms"/ { gsub(/,/, "", $2); mn = $2 }
        /"median_ms"/ { gsub(/,/, "", $2); printf "%s %s %s\n", s, mn, $2 }'
}

for n in $VQ_SIZES; do
    section "vqclip bench vqgan --size ${n}x$n --repeats $VQ_REPEATS --json"
    start=$(wc -c <"$TMP")
    if record "$BIN" bench vqgan --size "${n}x$n" --repeats "$VQ_REPEATS" --json; then
        ours="$(stage_rows "$(tail -c +"$((start + 1))" "$TMP")")"
    else
        failures=$((failures + 1))
        ours=""
        summary+="vqgan ${n}x$n: FAILED (see $OUT)"$'\n'
    fi
    theirs=""
    if [ $peer -eq 1 ]; then
        section "peer_vqgan_bench.py --size ${n}x$n --repeats $VQ_REPEATS --json"
        start=$(wc -c <"$TMP")
        if record "$PY" "$TOOLS/peer_vqgan_bench.py" --size "${n}x$n" --repeats "$VQ_REPEATS" \
            --json; then
            theirs="$(stage_rows "$(tail -c +"$((start + 1))" "$TMP")")"
        else
            failures=$((failures + 1))
            summary+="peer vqgan ${n}x$n: FAILED (see $OUT)"$'\n'
        fi
    fi
    while read -r stage mn med; do
        [ -n "$stage" ] || continue
        pm="$(printf '%s\n' "$theirs" | awk -v s="$stage" '$1 == s { print $2 }')"
        line="$(printf 'vqgan %4sx%-4s %-16s min %9.1f ms  median %9.1f ms' "$n" "$n" "$stage" \
            "$mn" "$med")"
        if [ -n "$pm" ]; then
            line+="$(printf '  pytorch min %9.1f ms  ratio %5.2f' "$pm" \
                "$(awk "BEGIN{print $mn / $pm}")")"
        fi
        summary+="$line"$'\n'
    done <<<"$ours"
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
        ms=""
    fi
    summary+="$line"$'\n'
    if [ $peer -eq 1 ]; then
        section "peer_generate_step.py --size ${n}x$n --cutn $GEN_CUTN --steps $GEN_STEPS --json"
        start=$(wc -c <"$TMP")
        if record "$PY" "$TOOLS/peer_generate_step.py" --size "${n}x$n" --cutn "$GEN_CUTN" \
            --steps "$GEN_STEPS" --json; then
            part="$(tail -c +"$((start + 1))" "$TMP")"
            pms="$(json_num "$part" mean_ms)"
            ppeak="$(json_num "$part" peak_bytes)"
            line="$(printf 'generate %4sx%-4s cutn %s: pytorch %9.1f ms/step  peak %6.0f MiB' \
                "$n" "$n" "$GEN_CUTN" "$pms" "$(awk "BEGIN{print ${ppeak:-0}/1048576}")")"
            if [ -n "$ms" ] && [ -n "$pms" ]; then
                line+="$(printf '  ratio %5.2f' "$(awk "BEGIN{print $ms / $pms}")")"
            fi
        else
            failures=$((failures + 1))
            line="peer generate ${n}x$n: FAILED (see $OUT)"
        fi
        summary+="$line"$'\n'
    fi
done

section "summary"
printf '%s' "$summary" >>"$TMP"
echo "failures: $failures" >>"$TMP"
mv "$TMP" "$OUT"
trap - EXIT

printf '%s' "$summary"
echo "results written to $OUT ($failures failures)"
[ "$failures" -eq 0 ]
