#!/usr/bin/env bash
# Makes sure this machine can build and run vqclip: a Rust toolchain and a Vulkan driver.
# On a machine without a GPU driver it installs Mesa's CPU Vulkan driver (lavapipe).
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "vqclip setup: cargo not found. Install Rust from your distribution or rustup first." >&2
    exit 1
fi

have_vulkan_driver() {
    # the loader, and at least one driver manifest
    ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' || return 1
    for f in /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json /usr/local/share/vulkan/icd.d/*.json; do
        [ -e "$f" ] && return 0
    done
    return 1
}

if [ "$(uname -s)" = "Linux" ] && ! have_vulkan_driver; then
    echo "vqclip setup: no Vulkan driver found; installing mesa-vulkan-drivers (CPU Vulkan)" >&2
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    else
        echo "vqclip setup: please install your distribution's Mesa Vulkan drivers (lavapipe)" >&2
        exit 1
    fi
fi
# Mesa warns about XDG_RUNTIME_DIR when it is unset; give it a private directory.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    export XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/vqclip-runtime-$(id -u)"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi
