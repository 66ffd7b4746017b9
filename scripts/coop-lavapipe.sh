#!/usr/bin/env bash
# Runs the cooperative-matrix tests on a lavapipe that has cooperative matrices: Mesa 26.1
# from Debian trixie-backports (Debian 12's Mesa 22.3 and bookworm-backports' 25.0 list
# none, so there the tests skip their kernel). Nothing is installed on the machine: apt
# downloads the driver and its libraries (C library included) into target/mesa-trixie,
# and cargo runs the test binaries through that tree's dynamic loader. Needs apt-get and
# network access to deb.debian.org (CI has both); about 150 MB.
#
#   bash scripts/coop-lavapipe.sh            the coop tests (kernel, device, info) and the
#                                            f16 CLIP tests on it
#   bash scripts/coop-lavapipe.sh -- ARGS    `cargo test --release ARGS` on it instead
set -euo pipefail
cd "$(dirname "$0")/.."
R="$PWD/target/mesa-trixie"
ROOT="$R/root"
if [ ! -e "$ROOT/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so" ]; then
    rm -rf "$R"
    mkdir -p "$R/lists/partial" "$R/cache/archives/partial" "$ROOT"
    cat >"$R/sources.list" <<EOF
deb http://deb.debian.org/debian trixie main
deb http://deb.debian.org/debian trixie-backports main
EOF
    : >"$R/status"
    # apt with its own lists, cache and an empty package status, so that it resolves every
    # library the driver needs in trixie and downloads it, touching nothing of the machine.
    apt_own=(
        -o "Dir::Etc::SourceList=$R/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$R/lists" -o "Dir::State::Status=$R/status"
        -o "Dir::Cache=$R/cache" -o APT::Architecture=amd64 -o Debug::NoLocking=1
        -o APT::Install-Recommends=false
    )
    apt-get "${apt_own[@]}" update -qq
    apt-get "${apt_own[@]}" install -y -qq --download-only \
        mesa-vulkan-drivers/trixie-backports libvulkan1 >/dev/null
    for deb in "$R"/cache/archives/*.deb; do
        dpkg-deb -x "$deb" "$ROOT"
    done
fi
loader="$ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
libs="$ROOT/usr/lib/x86_64-linux-gnu"
icd="$ROOT/usr/share/vulkan/icd.d/lvp_icd.json"
for f in "$loader" "$icd"; do
    [ -e "$f" ] || { echo "coop-lavapipe: $f is missing from the downloaded tree" >&2; exit 1; }
done
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$loader --library-path $libs"
export VK_DRIVER_FILES="$icd" VK_ICD_FILENAMES="$icd"
export VQCLIP_TUNING_FILE=""
if [ "${1:-}" = "--" ]; then
    shift
    exec cargo test --release "$@"
fi
# The driver must offer the configuration, or the tests below would skip their kernel.
cargo run --release --quiet -- info | tee "$R/info.txt" | grep -i "cooperative"
grep -q "F16->F32" "$R/info.txt" || {
    echo "coop-lavapipe: this lavapipe lists no f16 -> f32 cooperative matrix" >&2
    exit 1
}
# `info` says f16 products use it when asked to, and not when told not to.
VQCLIP_COOP_MATRIX=on cargo run --release --quiet -- info | grep -q "used by vqclip: for f16 products (8x8x8 F16->F32)" || {
    echo "coop-lavapipe: VQCLIP_COOP_MATRIX=on vqclip info does not report the 8x8x8 f16 products" >&2
    exit 1
}
VQCLIP_COOP_MATRIX=off cargo run --release --quiet -- info | grep -q "used by vqclip: no (VQCLIP_COOP_MATRIX=off)" || {
    echo "coop-lavapipe: VQCLIP_COOP_MATRIX=off vqclip info does not report it off" >&2
    exit 1
}
VQCLIP_TEST_REQUIRE_COOP=1 cargo test --release --lib -- coop
VQCLIP_COOP_MATRIX=on VQCLIP_F16_ACTIVATIONS=on cargo test --release --test clip_f16
