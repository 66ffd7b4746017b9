#!/usr/bin/env bash
# Runs the whole test suite (release build: the CPU references are slow in debug), installing
# a Vulkan driver first if the machine has none.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --release "$@"
