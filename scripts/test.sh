#!/usr/bin/env bash
# Set up both environments and run the whole test suite (what CI runs).
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -n 2 -m "not slow and not cli and not vllm"   # the unit tier only (under 2 min)
set -euo pipefail
cd "$(dirname "$0")/.."
# --dev: the test tools beside what a run uses.
bash scripts/setup.sh --dev
bash scripts/setup_vllm.sh
# The report tests open the HTML report in a real headless browser; METEOR needs Java.
bash scripts/install_chromium.sh
command -v java >/dev/null || { apt-get update -qq && apt-get install -y -qq default-jre-headless; }
export REGIONCAP_VLLM_PYTHON="$PWD/.venv-vllm/bin/python"
export REGIONCAP_REQUIRE_ALL=1
exec .venv/bin/python -m pytest "$@"
