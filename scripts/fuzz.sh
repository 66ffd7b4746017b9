#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60), one at a time on one core.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs nightly Rust and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo +nightly install cargo-fuzz`). Each target starts from its committed seeds
# (fuzz/seeds/<target>) and the inputs it once crashed on (fuzz/regressions/<target>); what
# it learns goes to fuzz/corpus/<target> (not committed). A crash stops the run and leaves
# its input in fuzz/artifacts/<target>/: copy it into fuzz/regressions/<target>/, fix the
# parser, and `cargo test --release --test fuzz_corpus` replays it on stable from then on.
# Each target's last libFuzzer line (executions, exec/s, coverage) is printed as it ends.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
# No sanitizer: the code under test is safe Rust, so ASan mostly costs speed; overflow
# checks and debug assertions stay on (-a), so an overflowing size computation panics.
cargo +nightly fuzz build -s none -a
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "regressions/$t"
    log="artifacts/$t.log"
    mkdir -p artifacts
    echo "== $t (${secs}s)"
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: over 2 GiB is a bomb.
    if ! cargo +nightly fuzz run -s none -a "$t" "corpus/$t" "seeds/$t" "regressions/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        echo "   CRASH or HANG: see $log and fuzz/artifacts/$t/"
        status=1
    fi
    grep -E '^#[0-9]+.*(DONE|pulse)' "$log" | tail -1 || true
    grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec' "$log" || true
done
exit $status
