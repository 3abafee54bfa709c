#!/usr/bin/env bash
# Install Debian's headless Chromium for the report's browser test
# (tests/test_report.py), only when it is missing. Safe to run again.
#   bash scripts/install_chromium.sh
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || command -v chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_chromium.sh: chromium is missing and this is not root (and there is no sudo);" >&2
        echo "  install Debian's 'chromium' package as root: apt-get install -y chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
echo "installed: $(chromium --version)"
