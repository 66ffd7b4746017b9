#!/usr/bin/env bash
# Trains candidate shapes models (weights/ README) on a machine with a GPU and no network, with
# a prebuilt vqclip release binary, every run fitted into one wall-clock budget. The runs share
# the GPU at once (each is too small to fill it). Results: one folder per run, holding the
# trained files, the training log and the measured quality (eval vqgan / eval clip).
#
#   scripts/gpu-train.sh BINARY OUTDIR SECONDS
#     BINARY   the vqclip release binary
#     OUTDIR   created; one sub-folder per run
#     SECONDS  wall-clock budget for the whole script (training gets what is left after
#              start-up, minus 45 s for the evaluations)
#   Environment: RUNS (default "vq_f4 vq_f4w vq_f2 clip_w64 clip_w128") picks the runs.
#
# The runs (configs/ holds their layouts):
#   vq_f4     VQGAN f4, ch 64, ch_mult [1,1,2], 1024 codes    batch 16, lr 1e-3
#   vq_f4w    VQGAN f4, ch 64, ch_mult [1,2,2], 1024 codes    batch 16, lr 1e-3
#   vq_f2     VQGAN f2, ch 64, ch_mult [1,1],   512 codes     batch 16, lr 1e-3
#   clip_w64  CLIP as shipped (width 64, 4+3 layers)          batch 256, lr 1e-3
#   clip_w128 CLIP width 128, 6+4 layers                      batch 256, lr 5e-4
set -uo pipefail

BIN="${1:?usage: gpu-train.sh BINARY OUTDIR SECONDS}"
DIR="${2:?usage: gpu-train.sh BINARY OUTDIR SECONDS}"
BUDGET="${3:?usage: gpu-train.sh BINARY OUTDIR SECONDS}"
RUNS="${RUNS:-vq_f4 vq_f4w vq_f2 clip_w64 clip_w128}"
start=$(date +%s)
mkdir -p "$DIR" || exit 2
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/vqclip-runtime-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
train_s=$((BUDGET - ($(date +%s) - start) - 45))
if [ "$train_s" -lt 30 ]; then
    echo "gpu-train: a budget of $BUDGET s leaves no time to train" >&2
    exit 2
fi
echo "gpu-train: $RUNS, $train_s s of training each, at once"

launch() {
    local name="$1"
    shift
    mkdir -p "$DIR/$name"
    # One tuning file per process: they measure and save kernel choices concurrently.
    VQCLIP_TUNING_FILE="$DIR/$name/tuning.json" "$BIN" "$@" --time-limit "$train_s" \
        >"$DIR/$name/train.out" 2>"$DIR/$name/train.err" &
    echo "$name $!"
}

pids=()
for r in $RUNS; do
    case "$r" in
    vq_f4) launch vq_f4 train vqgan --out "$DIR/vq_f4" \
        --config "$here/configs/vqgan_shapes_f4_c64.yaml" --name shapes_f4 --batch 16 \
        --lr 1e-3 --warmup 100 --steps 100000 --save-every 2000 --log "$DIR/vq_f4/log.jsonl" ;;
    vq_f4w) launch vq_f4w train vqgan --out "$DIR/vq_f4w" \
        --config "$here/configs/vqgan_shapes_f4_c64w.yaml" --name shapes_f4 --batch 16 \
        --lr 1e-3 --warmup 100 --steps 100000 --save-every 2000 --log "$DIR/vq_f4w/log.jsonl" ;;
    vq_f2) launch vq_f2 train vqgan --out "$DIR/vq_f2" \
        --config "$here/configs/vqgan_shapes_f2_c64.yaml" --name shapes_f2 --batch 16 \
        --lr 1e-3 --warmup 100 --steps 100000 --save-every 2000 --log "$DIR/vq_f2/log.jsonl" ;;
    clip_w64) launch clip_w64 train clip --out "$DIR/clip_w64" --batch 256 --lr 1e-3 \
        --steps 100000 --save-every 2000 ;;
    clip_w128) launch clip_w128 train clip --out "$DIR/clip_w128" \
        --config "$here/configs/clip_shapes_w128.json" --batch 256 --lr 5e-4 \
        --steps 100000 --save-every 2000 ;;
    *) echo "gpu-train: unknown run '$r'" >&2; continue ;;
    esac
    pids+=($!)
done
fails=0
for p in "${pids[@]}"; do
    wait "$p" || fails=$((fails + 1))
done
echo "gpu-train: training done after $(($(date +%s) - start)) s, $fails failed"
for r in $RUNS; do
    case "$r" in
    clip_*)
        if [ -f "$DIR/$r/model.safetensors" ]; then
            timeout 60 "$BIN" eval clip --clip "$DIR/$r" --json >"$DIR/$r/eval.json" \
                2>"$DIR/$r/eval.err" &
        fi ;;
    esac
done
wait
for r in $RUNS; do
    echo "== $r"
    tail -n 3 "$DIR/$r/train.err" 2>/dev/null | tr '\r' '\n' | tail -n 3
    tail -n 2 "$DIR/$r/train.out" 2>/dev/null
    cat "$DIR/$r/eval.json" 2>/dev/null
done
echo "gpu-train: finished after $(($(date +%s) - start)) s"
[ "$fails" -eq 0 ]
