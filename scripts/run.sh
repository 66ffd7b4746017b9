#!/usr/bin/env bash
# Runs the vqclip CLI (release build), installing a Vulkan driver first if the machine has none.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --quiet
exec ./target/release/vqclip "$@"
