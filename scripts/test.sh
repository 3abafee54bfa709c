#!/usr/bin/env bash
# Set up both environments and run the whole test suite (what CI runs).
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -m "not slow and not vllm"   # the fast unit tests only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh
export REGIONCAP_VLLM_PYTHON="$PWD/.venv-vllm/bin/python"
exec .venv/bin/python -m pytest "$@"
