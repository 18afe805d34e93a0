#!/usr/bin/env bash
# Install Debian's Chromium (headless browser for tests/test_browser.py) when it is missing.
#
# Idempotent: does nothing when a chromium binary is already on PATH. Needs
# root (or passwordless sudo) and the Debian package mirror; prints the binary
# it found or installed. Exit status 0 only when chromium is usable afterwards.
set -euo pipefail

find_chromium() {
    for name in chromium chromium-browser google-chrome-stable google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if binary=$(find_chromium); then
    echo "chromium present: $binary"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_chromium.sh: chromium is missing and installing it needs root (apt-get install chromium)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null

if binary=$(find_chromium); then
    echo "chromium installed: $binary"
    "$binary" --version || true
else
    echo "install_chromium.sh: apt-get finished but no chromium binary is on PATH" >&2
    exit 1
fi
